//! Crashes: child processes refresh and save in a loop through a `FileStore`; the parent
//! kills them with SIGKILL at random moments, then checks what the store holds.
//!
//! The one loss no library can prevent: a child killed after the provider rotated the
//! refresh token and before the new one reached the file. The test counts those trials
//! (the stored refresh token is no longer the provider's live one) and re-seeds them with
//! a new grant; every other trial must leave the live refresh token in an intact file.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokenkeeper::testing::{Mode, Simulator};
use tokenkeeper::{
    ClientCredentials, FileStore, ProviderProfile, RefreshingTokenSource, TokenStore,
};
use url::Url;

const CHILD: &str = "TOKENKEEPER_CRASH_CHILD";
const KEY: &str = "crash";
const TRIALS: usize = 250;
/// Kill delays are drawn from `0..MAX_KILL_DELAY` after the spawn: some kills land during
/// the child's start, most during its refresh loop.
const MAX_KILL_DELAY_MS: u64 = 120;

/// The child's side: refresh and save, as fast as it can, until killed.
#[test]
fn crash_child_process() {
    let Ok(config) = std::env::var(CHILD) else {
        return;
    };
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    let text = |k: &str| config[k].as_str().unwrap().to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let profile = ProviderProfile::lucid().with_token_url(Url::parse(&text("url")).unwrap());
        let source = RefreshingTokenSource::builder(
            profile,
            ClientCredentials::new("sim-client", "sim-secret"),
        )
        .store(FileStore::new(text("dir")))
        .key(KEY)
        .build()
        .unwrap();
        loop {
            let token = source
                .access_token()
                .await
                .expect("every refresh succeeds until the kill");
            // The API "rejected" it: the next call refreshes (and saves) again.
            source.invalidate(&token);
        }
    });
}

/// xorshift64*: reproducible delays without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// Waits until the simulator has answered everything a killed child may have left in its
/// socket: no new request for 20 ms.
async fn settle(sim: &Simulator) {
    let mut seen = sim.counters().requests;
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = sim.counters().requests;
        if now == seen {
            return;
        }
        seen = now;
    }
}

fn temp_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.starts_with(".tokenkeeper-") && name.ends_with(".tmp")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_never_tears_the_store_file() {
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path());
    let importer = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .store(store.clone())
        .key(KEY)
        .build()
        .unwrap();
    importer
        .import_refresh_token(sim.issue_grant())
        .await
        .unwrap();
    let mut grant = 0;
    let config = serde_json::json!({
        "url": sim.token_url().as_str(),
        "dir": dir.path().to_str().unwrap(),
    })
    .to_string();

    let mut rng = Rng(0x0dd_ba11);
    let mut lost = 0;
    let mut trials_with_refreshes = 0;
    let started = Instant::now();
    for trial in 0..TRIALS {
        let refreshes_before = sim.counters().refreshes;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_child_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, &config)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(rng.below(MAX_KILL_DELAY_MS))).await;
        if let Some(status) = child.try_wait().unwrap() {
            panic!("trial {trial}: the child stopped by itself: {status}");
        }
        child.kill().unwrap();
        child.wait().unwrap();
        settle(&sim).await;
        if sim.counters().refreshes > refreshes_before {
            trials_with_refreshes += 1;
        }

        // Never torn: the file decodes to a complete token set.
        let stored = store
            .load(KEY)
            .await
            .unwrap_or_else(|e| panic!("trial {trial}: the store file is unreadable: {e}"))
            .unwrap_or_else(|| panic!("trial {trial}: the store file vanished"));
        assert!(
            stored.value.access_token.is_some() || stored.value.refresh_token.is_some(),
            "trial {trial}: the stored set holds no token"
        );
        let stored_refresh = stored.value.refresh_token.map(|t| t.secret().to_owned());
        if stored_refresh != sim.current_refresh_token(grant) {
            // Killed between the provider's answer and the write: the rotated token is
            // gone with the process. Start over with a new consent.
            lost += 1;
            importer
                .import_refresh_token(sim.issue_grant())
                .await
                .unwrap();
            grant += 1;
        }
    }
    let counters = sim.counters();
    println!(
        "crash: {TRIALS} SIGKILL trials in {:.1?}: {trials_with_refreshes} killed a child that had refreshed, {} refreshes, {lost} lost a rotated refresh token, {} leftover temp files, reuse attempts {}",
        started.elapsed(),
        counters.refreshes,
        temp_files(dir.path()),
        counters.reuse_attempts,
    );
    assert_eq!(
        counters.reuse_attempts, 0,
        "a used refresh token was never presented again"
    );
    assert_eq!(counters.revoked_grants, 0);
    assert!(
        trials_with_refreshes > TRIALS / 2,
        "most kills landed in the refresh loop"
    );
}
