//! Subnet leases in etcd, the flannel way: the registry seam, its etcd and in-memory
//! implementations, the lease records and keys, allocation, the lease manager, the peer
//! watcher with the checks of what it installs (`validate`), and the subnet file.
//!
//! The in-memory registry (`fake`) and the registry contract (`contract`) are test code: they
//! are compiled only for the unit tests and with the `test-util` feature (which the agent's
//! own integration tests turn on), never into the release binary.

pub mod alloc;
pub mod config;
#[cfg(any(test, feature = "test-util"))]
pub mod contract;
pub mod etcd;
#[cfg(any(test, feature = "test-util"))]
pub mod fake;
pub mod file;
pub mod lease;
pub mod manager;
pub mod registry;
pub mod validate;
pub mod watch;

pub use etcd::{EtcdOptions, EtcdRegistry};
#[cfg(any(test, feature = "test-util"))]
pub use fake::FakeRegistry;
pub use lease::{LeaseAttrs, Mac};
pub use manager::{Lease, ManagerError, ManagerOptions, SubnetManager};
pub use registry::{Registry, RegistryError};
pub use watch::{Peer, PeerEvent};

#[cfg(test)]
mod tests;
