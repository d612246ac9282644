//! `xfs-node`: the serverless file system node (placeholder).
//!
//! It will hold the roles of DESIGN.md §4 (client, manager, storage server), the manager map,
//! the coherence state machine and its model, the per-core shard loops, the striped log on
//! io_uring, recovery and the `xfs-node` binary. Nothing here is usable yet.
