//! Storage (DESIGN.md §4): fragments on a device: the fragment store, on io_uring with
//! O_DIRECT and registered buffers ([`uring`]) and in memory with fault injection
//! ([`fragment::MemFragmentStore`]); storage servers serving it over Active Messages and
//! their clients ([`remote`]); the striped, parity-protected log with its imap,
//! checkpoints and recovery ([`log`]), reached by the shards through the log actor
//! ([`log_actor`]); the cleaner ([`cleaner`]) keeps the log from
//! filling up.

pub mod cleaner;
pub mod fragment;
pub mod log;
pub mod log_actor;
pub mod remote;
pub mod uring;
