//! Storage (DESIGN.md §4): fragments on a device: the fragment store, on io_uring with
//! O_DIRECT and registered buffers ([`uring`]) and in memory with fault injection
//! ([`fragment::MemFragmentStore`]); storage servers serving it over Active Messages and
//! their clients ([`remote`]); the striped, parity-protected log with its imap,
//! checkpoints and recovery ([`log`]); the cleaner ([`cleaner`]) keeps the log from
//! filling up.

pub mod block_store;
pub mod cleaner;
pub mod fragment;
pub mod log;
pub mod remote;
pub mod uring;
