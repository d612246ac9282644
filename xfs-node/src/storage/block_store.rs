//! The storage role's [`BlockStore`] over the node's log: [`LogStore`], shared by the
//! node's shards (and by the simulations, over simulated stores). Today each call locks
//! the node's one log and runs inside the calling shard loop (docs/architecture.md).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::coherence::{BlockId, BlockStore, SyncError};
use crate::fs::layout::block_name;
use crate::lock;
use crate::storage::fragment::{FragmentStore, StoreError};
use crate::storage::log::{Log, LogError};

/// The shards' storage role: the node's log (absent on a node without the manager role),
/// shared by the node's shards.
pub struct LogStore<S: FragmentStore> {
    /// The log.
    pub log: Arc<Mutex<Option<Log<S>>>>,
    /// Set while the log cannot write what it holds (its stores are full): the node's
    /// `statfs` reports no free space, so writes fail with ENOSPC at once.
    pub full: Arc<AtomicBool>,
}

impl<S: FragmentStore + Send> BlockStore<Vec<u8>> for LogStore<S> {
    fn read(&mut self, block: BlockId) -> Result<Vec<u8>, String> {
        let mut g = lock(&self.log);
        let log = g.as_mut().ok_or("this node has no log (no manager role)")?;
        match log.read(block) {
            Ok(d) => Ok(d),
            Err(LogError::NotFound(_)) => Ok(Vec::new()),
            Err(e) => {
                // Named, so that an operator knows which file lost what (the read that
                // needs it fails with EIO; the file's other blocks still read).
                let m = format!("{}: {e}", block_name(block));
                eprintln!("xfs-node: cannot read {m}");
                Err(m)
            }
        }
    }
    fn write(&mut self, block: BlockId, data: Vec<u8>) -> Result<(), String> {
        let mut g = lock(&self.log);
        let log = g.as_mut().ok_or("this node has no log (no manager role)")?;
        let r = log.write(block, &data).map_err(|e| e.to_string());
        self.full.store(log.is_full(), Ordering::Relaxed);
        r
    }
    fn sync(&mut self) -> Result<(), SyncError> {
        let mut g = lock(&self.log);
        let Some(log) = g.as_mut() else {
            return Ok(());
        };
        let r = log.fsync();
        self.full.store(log.is_full(), Ordering::Relaxed);
        r.map_err(|e| SyncError {
            errno: match e {
                LogError::Store(StoreError::NoSpace { .. }) => libc::ENOSPC,
                _ => libc::EIO,
            },
            message: e.to_string(),
        })
    }
}
