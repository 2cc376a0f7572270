//! Test support (feature `testing`): a provider simulator for examples, this crate's tests
//! and your own integration tests, and [`FaultyStore`], which injects store faults. No
//! credentials, no network beyond loopback.

mod faults;
mod simulator;

pub use faults::{FaultCounts, FaultyStore, StoreFault, StoreOp};
pub use simulator::{Counters, Fault, Mode, Simulator, SimulatorBuilder};

/// How many HTTP clients this process has built for token endpoints so far: sources
/// share one per profile setting (connect timeout, loopback), a manager builds its own.
/// For tests that check clients are shared.
pub fn http_clients_built() -> usize {
    crate::http::CLIENTS_BUILT.load(std::sync::atomic::Ordering::Relaxed)
}
