//! The first step of the agent's pipeline, etcd to peer events, the flannel way: the network
//! config (`config`), the registry seam (`registry`) and its etcd implementation, the lease
//! records and keys (`lease`), allocation, this node's lease (`manager`), the other nodes'
//! leases as [`PeerEvent`]s (`watch`) with the checks of what they may install (`validate`),
//! and the subnet file (`file`).
//!
//! Owns everything the agent reads from or writes to etcd. May call the registry and
//! `json_ci`; never the data path or netlink (the daemon passes peer events on to `backend`).
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
