//! Subnet leases in etcd, the flannel way: the registry seam, its etcd and in-memory
//! implementations, the lease records and keys, allocation, the lease manager, the peer
//! watcher with the checks of what it installs (`validate`), and the subnet file.

pub mod alloc;
pub mod etcd;
pub mod fake;
pub mod file;
pub mod lease;
pub mod manager;
pub mod peers;
pub mod registry;
pub mod validate;

pub use etcd::{EtcdOptions, EtcdRegistry};
pub use fake::FakeRegistry;
pub use lease::{LeaseAttrs, Mac};
pub use manager::{Lease, ManagerError, ManagerOptions, SubnetManager};
pub use peers::{Peer, PeerEvent};
pub use registry::{Registry, RegistryError};

#[cfg(test)]
mod tests;
