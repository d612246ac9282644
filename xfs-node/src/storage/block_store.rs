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

/// Why [`LogStore`] could not read or write a block.
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    /// The node keeps no log.
    #[error("this node has no log (no manager role)")]
    NoLog,
    /// The log could not read the block: named by file and byte range
    /// ([`block_name`]), so that an operator knows which file lost what.
    #[error("{}: {source}", block_name(*block))]
    Read {
        /// The block.
        block: BlockId,
        /// What failed.
        #[source]
        source: LogError,
    },
    /// The log could not take the block.
    #[error(transparent)]
    Write(LogError),
}

impl<S: FragmentStore + Send> BlockStore<Vec<u8>> for LogStore<S> {
    type Error = LogStoreError;
    fn read(&mut self, block: BlockId) -> Result<Vec<u8>, LogStoreError> {
        let mut g = lock(&self.log);
        let log = g.as_mut().ok_or(LogStoreError::NoLog)?;
        match log.read(block) {
            Ok(d) => Ok(d),
            Err(LogError::NotFound(_)) => Ok(Vec::new()),
            Err(source) => {
                // Named, so that an operator knows which file lost what (the read that
                // needs it fails with EIO; the file's other blocks still read).
                let e = LogStoreError::Read { block, source };
                eprintln!("xfs-node: cannot read {e}");
                Err(e)
            }
        }
    }
    fn write(&mut self, block: BlockId, data: Vec<u8>) -> Result<(), LogStoreError> {
        let mut g = lock(&self.log);
        let log = g.as_mut().ok_or(LogStoreError::NoLog)?;
        let r = log.write(block, &data).map_err(LogStoreError::Write);
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
