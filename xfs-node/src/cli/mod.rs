//! The `xfs-node` binary's longer commands, declared from `main.rs` (not part of the
//! library): the local cluster's `up`, `mount` and `down` ([`local_cluster`]) and the
//! `status` report ([`status`]).

pub(crate) mod local_cluster;
pub(crate) mod status;
