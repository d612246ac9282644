//! Storage (DESIGN.md §4): fragments on a device. So far: the fragment store, on io_uring
//! with O_DIRECT and registered buffers ([`uring`]) and in memory with fault injection
//! ([`fragment::MemFragmentStore`]). The striped, parity-protected log, the imap and
//! recovery build on it; the cleaner ([`cleaner`]) keeps the log from filling up.

pub mod cleaner;
pub mod fragment;
pub mod log;
pub mod remote;
pub mod uring;
