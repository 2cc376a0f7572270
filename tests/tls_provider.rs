//! TLS cryptography comes from the provider the build selects (the `aws-lc-rs` feature,
//! the default, or `ring` alone), installed as the process's default the first time the
//! library needs TLS, unless the application installed one first. One test in this file:
//! the default is process-wide.

use rustls::NamedGroup;
use rustls::crypto::CryptoProvider;
use tokenkeeper::RefreshingTokenSource;
use tokenkeeper::testing::{Mode, Simulator};

#[tokio::test]
async fn the_builds_provider_is_installed_and_serves_token_requests() {
    assert!(
        CryptoProvider::get_default().is_none(),
        "nothing installed yet"
    );
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let source = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .initial_refresh_token(sim.issue_grant())
        .build()
        .unwrap();
    source.access_token().await.unwrap();
    let installed = CryptoProvider::get_default().expect("the build's provider is installed");
    // aws-lc-rs offers post-quantum hybrid key exchange; ring does not.
    let post_quantum = installed
        .kx_groups
        .iter()
        .any(|group| group.name() == NamedGroup::X25519MLKEM768);
    assert_eq!(
        post_quantum,
        cfg!(feature = "aws-lc-rs"),
        "aws-lc-rs when compiled in (even beside ring), else ring"
    );
}
