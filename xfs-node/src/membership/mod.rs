//! Membership by consensus: who is in the cluster, which node manages what, and the epoch
//! every coherence message is fenced by (`coherence::Fence`).
//!
//! * [`map`]: the replicated state, [`ClusterMap`] (members with incarnations, the manager
//!   map, the stripe-group map, the epoch), and the [`Change`]s that move it.
//! * [`consensus`]: the log those changes go through, TiKV's `raft-rs` driven sans-IO
//!   ([`Consensus`]): ticks, peers' messages and proposals in; what to persist, what to
//!   send and what was applied out.
//! * [`run`]: the membership loop, the thread that drives the log over the node's own
//!   endpoint, keeps it on disk, proposes joins and failures, and tells the shard loops.
//!
//! Why `raft-rs` and not `openraft`: `raft-rs` has no runtime of its own (tick, step,
//! ready), so it fits the node's single-threaded, sans-IO loops and the seeded
//! simulation; `openraft` 0.9 drives itself on tokio tasks and timers.
//!
//! A node is declared failed only by a committed [`Change::Fail`]: the AM layer finding a
//! peer unreachable proposes it, never decides it.

pub mod consensus;
pub mod map;
pub mod run;

pub use consensus::*;
pub use map::*;
pub use run::{MembershipStatus, MembershipUpdate};
