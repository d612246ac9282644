//! `fs-testkit`: test tools for the file system as its users meet it, through mounts
//! (`publish = false`; no product crate depends on it).
//!
//! - [`fsx`]: the engine of `fsx-mounts`, an fsx that applies each random operation
//!   through one of several mounts of one cluster and checks every result against an
//!   in-memory model: whatever one node did, the next operation on any node sees.
//! - [`linearizable`]: a linearizability checker for registers (files written whole and
//!   read whole from several mounts, every operation with its start, end and result).

#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod fsx;
pub mod linearizable;
