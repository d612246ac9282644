//! `xfs-node`: the serverless file system node of DESIGN.md §4.
//!
//! Built so far: the per-block cache-coherence protocol as a pure state machine
//! ([`coherence`]), checked by the `stateright` model in `tests/model/`, and the per-core
//! shard loops that run it over Active Messages ([`shard`]), with a deterministic cluster
//! simulation ([`sim`]). Storage (the striped log), the namespace and the `xfs-node` binary
//! come with the storage and cluster issues.

pub mod coherence;
pub mod fs;
pub mod node;
pub mod shard;
pub mod sim;
pub mod storage;
