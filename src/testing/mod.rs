//! Test support (feature `testing`): a provider simulator for examples, this crate's tests
//! and your own integration tests, and [`FaultyStore`], which injects store faults. No
//! credentials, no network beyond loopback.

mod faults;
mod simulator;

pub use faults::{FaultCounts, FaultyStore, StoreFault, StoreOp};
pub use simulator::{Counters, Fault, Mode, Simulator, SimulatorBuilder};
