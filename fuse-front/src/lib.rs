//! `fuse-front`: the FUSE mount of the file system (placeholder).
//!
//! It will translate FUSE operations to the `xfs-node` client API and invalidate the
//! kernel's page cache when a block is revoked. Nothing here is usable yet.
