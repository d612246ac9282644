//! The storage role: fetches (delegated replies) and write-backs served from a
//! [`BlockStore`] ([`StorageShard`]), and the in-memory store the model and tests use.

use super::*;

/// Block storage as the storage role sees it: the node's log plugs in here
/// (`storage::block_store::LogStore`);
/// the simulation and the model use [`MemStore`]. Errors name what failed: the storage
/// role counts them ([`ProtocolError::Storage`], with the error's text) and sends no reply
/// (the requester times out with EIO), never a made-up content.
pub trait BlockStore<D> {
    /// What a read or a write reports when it fails.
    type Error: std::error::Error + Send + Sync + 'static;
    /// The block's current content (the default value if it was never written).
    fn read(&mut self, block: BlockId) -> Result<D, Self::Error>;
    /// Replace the block's content (durable once [`BlockStore::sync`] returns).
    fn write(&mut self, block: BlockId, data: D) -> Result<(), Self::Error>;
    /// Make every write so far durable.
    fn sync(&mut self) -> Result<(), SyncError> {
        Ok(())
    }
}

/// Why a store could not make its writes durable: the errno a client's `fsync` returns
/// (ENOSPC for a full device, EIO otherwise) and what failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SyncError {
    /// The errno.
    pub errno: i32,
    /// What failed.
    pub message: String,
}

impl SyncError {
    /// An I/O error (EIO) with `message`.
    pub fn io(message: impl Into<String>) -> SyncError {
        SyncError {
            errno: libc::EIO,
            message: message.into(),
        }
    }
}

/// An in-memory [`BlockStore`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemStore<D> {
    /// Written blocks.
    pub blocks: BTreeMap<BlockId, D>,
}

impl<D: Clone + Default> BlockStore<D> for MemStore<D> {
    type Error = std::convert::Infallible;
    fn read(&mut self, block: BlockId) -> Result<D, Self::Error> {
        Ok(self.blocks.get(&block).cloned().unwrap_or_default())
    }
    fn write(&mut self, block: BlockId, data: D) -> Result<(), Self::Error> {
        self.blocks.insert(block, data);
        Ok(())
    }
}

/// The storage side of one shard.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageShard<S> {
    /// The store.
    pub store: S,
}

impl<S> StorageShard<S> {
    /// A message for the storage role, from node `from`.
    pub fn receive<D: Clone>(
        &mut self,
        from: NodeId,
        msg: Msg<D>,
        out: &mut Vec<Output<D>>,
    ) -> Result<(), ProtocolError>
    where
        S: BlockStore<D>,
    {
        match msg {
            Msg::Fetch {
                block,
                to,
                seq,
                exclusive,
            } => {
                let data = self
                    .store
                    .read(block)
                    .map_err(|e| ProtocolError::Storage(e.to_string()))?;
                out.push(Output::Send {
                    to,
                    msg: Msg::Data {
                        block,
                        seq,
                        data,
                        exclusive,
                        from_cache: false,
                    },
                });
                Ok(())
            }
            Msg::WriteBack { block, data } => {
                self.store
                    .write(block, data)
                    .map_err(|e| ProtocolError::Storage(e.to_string()))?;
                out.push(Output::Send {
                    to: from,
                    msg: Msg::WriteBackAck { block },
                });
                Ok(())
            }
            other => Err(ProtocolError::Unexpected {
                block: other.block(),
                msg: msg_name(&other),
                state: "storage",
            }),
        }
    }
}
