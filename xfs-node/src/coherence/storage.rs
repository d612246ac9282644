//! The storage role: fetches (delegated replies) and write-backs served from a
//! [`BlockStore`] ([`StorageShard`]), and the in-memory store the model and tests use.

use super::*;

/// Block storage as [`StorageShard::receive`] uses it at once: the model, the block-level
/// simulation and tests use [`MemStore`]; a node's shards hand their storage work to the
/// log actor instead (`storage::log_actor`, [`ActorStore`]). Errors name what failed: the storage
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

/// Where the storage role's answer to a message goes once its store has done the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StoreReply {
    /// A [`Msg::Fetch`]: the block's content goes to `to` as [`Msg::Data`].
    Data {
        /// The client.
        to: NodeId,
        /// The sequence number reserved for the reply on its channel.
        seq: u32,
        /// Whether the reply grants the write token.
        exclusive: bool,
    },
    /// A [`Msg::WriteBack`]: acknowledged to `to` once written.
    WriteBackAck {
        /// The writer.
        to: NodeId,
    },
}

/// What the storage role asks of its store for one message: the sans-IO half of
/// [`StorageShard`]. A driver runs it on the store (in a node, the log actor:
/// `storage::log_actor`) and gives the result to [`StorageShard::answer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreRequest<D> {
    /// The block.
    pub block: BlockId,
    /// `None`: read it; `Some(data)`: write `data`.
    pub write: Option<D>,
    /// Where the answer goes.
    pub reply: StoreReply,
}

/// The storage side of one shard.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageShard<S> {
    /// The store (used by [`StorageShard::receive`]; a shard whose store requests go to an
    /// actor keeps none here).
    pub store: S,
}

impl<S> StorageShard<S> {
    /// The store work a message for the storage role from node `from` asks for (sans-IO:
    /// nothing is read or written here).
    pub fn request<D>(from: NodeId, msg: Msg<D>) -> Result<StoreRequest<D>, ProtocolError> {
        match msg {
            Msg::Fetch {
                block,
                to,
                seq,
                exclusive,
            } => Ok(StoreRequest {
                block,
                write: None,
                reply: StoreReply::Data { to, seq, exclusive },
            }),
            Msg::WriteBack { block, data } => Ok(StoreRequest {
                block,
                write: Some(data),
                reply: StoreReply::WriteBackAck { to: from },
            }),
            other => Err(ProtocolError::Unexpected {
                block: other.block(),
                msg: msg_name(&other),
                state: "storage",
            }),
        }
    }

    /// The store did the work of a request for `block`: send its answer. `result` is the
    /// block's content for a read (`Some`), nothing for a write, or what failed (counted by
    /// the caller as [`ProtocolError::Storage`]; no reply is sent: the requester times out
    /// with EIO, never a made-up content).
    pub fn answer<D>(
        block: BlockId,
        reply: StoreReply,
        result: Result<Option<D>, String>,
        out: &mut Vec<Output<D>>,
    ) -> Result<(), ProtocolError> {
        match (reply, result.map_err(ProtocolError::Storage)?) {
            (StoreReply::Data { to, seq, exclusive }, Some(data)) => {
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
            (StoreReply::WriteBackAck { to }, None) => {
                out.push(Output::Send {
                    to,
                    msg: Msg::WriteBackAck { block },
                });
                Ok(())
            }
            (StoreReply::Data { .. }, None) => Err(ProtocolError::Storage(format!(
                "the store answered a read of block {block} with no content"
            ))),
            (StoreReply::WriteBackAck { .. }, Some(_)) => Err(ProtocolError::Storage(format!(
                "the store answered a write of block {block} with content"
            ))),
        }
    }

    /// A message for the storage role, from node `from`, done at once on [`Self::store`]
    /// ([`StorageShard::request`], the store, [`StorageShard::answer`]).
    pub fn receive<D: Clone>(
        &mut self,
        from: NodeId,
        msg: Msg<D>,
        out: &mut Vec<Output<D>>,
    ) -> Result<(), ProtocolError>
    where
        S: BlockStore<D>,
    {
        let req = Self::request(from, msg)?;
        let result = match req.write {
            None => self.store.read(req.block).map(Some),
            Some(data) => self.store.write(req.block, data).map(|()| None),
        }
        .map_err(|e| e.to_string());
        Self::answer(req.block, req.reply, result, out)
    }
}

/// The store of a shard whose storage work goes to an actor (`Shard::external_store`: in a
/// node, the log actor): it holds nothing, and a call made to it anyway fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActorStore;

/// A block store call made on [`ActorStore`] (the shard was not set to hand its storage
/// work out).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("this shard's storage work goes to the log actor; set `external_store`")]
pub struct NotExternal;

impl<D> BlockStore<D> for ActorStore {
    type Error = NotExternal;
    fn read(&mut self, _: BlockId) -> Result<D, NotExternal> {
        Err(NotExternal)
    }
    fn write(&mut self, _: BlockId, _: D) -> Result<(), NotExternal> {
        Err(NotExternal)
    }
    fn sync(&mut self) -> Result<(), SyncError> {
        Err(SyncError::io(NotExternal.to_string()))
    }
}
