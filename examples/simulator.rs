//! The provider simulator as a server, to try the `tokenkeeper` command without
//! credentials:
//!
//! ```sh
//! cargo run --example simulator -- generic      # or lucid, highq, autodesk
//! ```
//!
//! It prints the flags that point `tokenkeeper login` at it, and serves until stopped.
//! Its authorization endpoint consents at once: open the URL `login` prints (or
//! `curl -sL` it) and the redirect reaches the command's loopback listener.

use tokenkeeper::testing::{Mode, Simulator};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mode = match std::env::args().nth(1).as_deref().unwrap_or("generic") {
        "generic" => Mode::Generic,
        "lucid" => Mode::Lucid,
        "highq" => Mode::HighQ,
        "autodesk" => Mode::Autodesk,
        other => {
            eprintln!("unknown provider {other:?}: use generic, lucid, highq or autodesk");
            std::process::exit(2);
        }
    };
    let sim = Simulator::builder(mode).start().await?;
    let profile = sim.profile();
    let mut flags = format!(
        "--provider {} --client-id sim-client --token-url {}",
        profile.name, profile.token_url
    );
    if mode == Mode::HighQ {
        flags = format!(
            "--provider highq --client-id sim-client --base-url {}",
            sim.base_url()
        );
    } else {
        flags.push_str(&format!(
            " --authorization-url {} --device-authorization-url {}",
            sim.authorization_url(),
            sim.device_authorization_url()
        ));
        if let Some(revocation) = sim.revocation_url() {
            flags.push_str(&format!(" --revocation-url {revocation}"));
        }
    }
    println!("The simulator ({mode:?}) is serving. In another terminal:\n");
    println!("  export TOKENKEEPER_CLIENT_SECRET=sim-secret");
    println!("  tokenkeeper login {flags} --no-browser");
    println!("  tokenkeeper token\n");
    println!("Open the URL `login` prints (or `curl -sL` it): the simulator consents at once.");
    println!("Stop with Ctrl-C.");
    tokio::signal::ctrl_c().await?;
    let counters = sim.counters();
    println!(
        "\n{} code exchanges, {} refreshes, {} reuse attempts",
        counters.code_exchanges, counters.refreshes, counters.reuse_attempts
    );
    Ok(())
}
