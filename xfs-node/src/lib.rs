//! `xfs-node`: the serverless file system node of DESIGN.md §4.
//!
//! The per-block cache-coherence protocol as a pure state machine ([`coherence`]), checked
//! by the `stateright` model in `tests/model/`, the per-core shard loops that run it over
//! Active Messages ([`shard`]) with a block-level simulation ([`sim`]), the storage layer
//! ([`storage`]: fragment stores, storage servers over AM, the striped log), the file
//! system on top ([`fs`]: block layout, the client API, the whole-cluster simulation), and
//! the node process with its config and control socket ([`node`]). `src/main.rs` is the
//! `xfs-node` CLI. See docs/cluster.md.
//!
//! `unsafe` is denied here except in the io_uring store ([`storage::uring`]) and the few
//! process-level system calls of [`os`].

#![deny(unsafe_code)]

pub mod coherence;
pub mod fs;
pub mod membership;
pub mod node;
pub mod os;
pub mod shard;
#[cfg(feature = "sim")]
pub mod sim;
pub mod storage;

/// Locks `m`; a poisoned mutex (a thread panicked holding it) still yields its data: every
/// critical section in this crate leaves the data whole at each step, and one panicking
/// thread must not take the node's other threads down with it.
pub(crate) fn lock<X>(m: &std::sync::Mutex<X>) -> std::sync::MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
