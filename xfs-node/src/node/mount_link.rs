//! A mount attached to this node ([`Node::attach_mount`]): the shards' kernel
//! invalidations handed to it over a bounded queue, its answers routed back to the
//! client. A mount served in this process (`xfsam-mount --serve`) holds the
//! [`MountAttachment`] itself; a mount in another process subscribes on the control socket,
//! whose thread holds one and forwards it (`mount_stream`).

use std::collections::BTreeSet;

use super::*;

/// Why a mount could not attach.
#[derive(Debug, thiserror::Error)]
#[error("node {0} already has a mount attached (one mount per node)")]
pub struct MountBusy(pub NodeId);

/// The attached mount's end of the node's invalidation queue. While it lives, the shards'
/// kernel invalidations wait for the mount's answer ([`MountAnswers::kernel_done`]); when it
/// is dropped the node forgets the mount and whatever it had not answered completes (its
/// kernel cache went with it).
pub struct MountAttachment {
    rx: mpsc::Receiver<Vec<BlockId>>,
    answers: MountAnswers,
    link: MountLink,
}

/// Where a mount answers invalidations; cloned into its worker threads.
#[derive(Clone)]
pub struct MountAnswers {
    /// Blocks handed to the mount and not answered yet.
    outstanding: Arc<Mutex<BTreeSet<BlockId>>>,
    client: Arc<FsClient<NodeBlocks>>,
}

impl MountAnswers {
    /// The kernel dropped these blocks. Only blocks handed to the mount and not answered
    /// yet count: advisory ones ([`control::ADVISORY`]) need no answer, and an answer that
    /// comes after the mount detached (whose blocks were completed then) is ignored, so
    /// it can never complete a later invalidation of the same block.
    pub fn kernel_done(&self, mut blocks: Vec<BlockId>) {
        {
            let mut o = lock(&self.outstanding);
            blocks.retain(|b| o.remove(b));
        }
        if !blocks.is_empty() {
            self.client.blocks.kernel_done(blocks);
        }
    }
}

impl MountAttachment {
    /// The next batch of blocks whose kernel copies must go (an advisory block,
    /// [`control::ADVISORY`], was changed by this node's CLI and needs no answer);
    /// `Timeout` after `wait`, `Disconnected` once the node stopped.
    pub fn recv_timeout(&self, wait: Duration) -> Result<Vec<BlockId>, mpsc::RecvTimeoutError> {
        let blocks = self.rx.recv_timeout(wait)?;
        lock(&self.answers.outstanding).extend(
            blocks
                .iter()
                .copied()
                .filter(|b| b & control::ADVISORY == 0),
        );
        Ok(blocks)
    }

    /// Where to answer.
    pub fn answers(&self) -> MountAnswers {
        self.answers.clone()
    }
}

impl Drop for MountAttachment {
    fn drop(&mut self) {
        // The shards send under this lock: once it is cleared, nothing more is queued.
        *lock(&self.link) = None;
        let mut left: Vec<BlockId> = std::mem::take(&mut *lock(&self.answers.outstanding))
            .into_iter()
            .collect();
        while let Ok(v) = self.rx.try_recv() {
            left.extend(v.into_iter().filter(|b| b & control::ADVISORY == 0));
        }
        if !left.is_empty() {
            self.answers.client.blocks.kernel_done(left);
        }
    }
}

impl Node {
    /// Attach a mount to this node's client (one at a time): from now on its shards wait
    /// for the mount's kernel to drop a block before they give it up.
    pub fn attach_mount(&self) -> Result<MountAttachment, MountBusy> {
        let (tx, rx) = mpsc::sync_channel::<Vec<BlockId>>(MOUNT_QUEUE);
        let mut g = lock(&self.mount);
        if g.is_some() {
            return Err(MountBusy(self.id));
        }
        *g = Some(tx);
        Ok(MountAttachment {
            rx,
            answers: MountAnswers {
                outstanding: Arc::default(),
                client: self.client.clone(),
            },
            link: self.mount.clone(),
        })
    }
}
