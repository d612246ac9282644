//! `bench`: Active Messages microbenchmarks against raw UDP in the same run.
//!
//! The `am-bench` binary measures round-trip latency, streaming bandwidth and
//! small-message rate of `am-core` over `am-udp` (and over the simulator, which isolates
//! the engine's own cost), and the same shapes with plain UDP sockets as the floor, with
//! busy-polling and blocking waits. Latency is an HdrHistogram after a warm-up. Results
//! are rows (see [`report::Row`]) written as JSON and Markdown.

pub mod am_side;
pub mod cases;
pub mod coherence;
pub mod dpdk_raw;
pub mod mounts;
pub mod peers;
pub mod plot;
pub mod raw;
pub mod report;
pub mod verbs_peer;
