//! The control socket: how the CLI, the benchmarks and the mount (`xfsam-mount`) use a node's
//! client. A Unix stream socket; each request and response is a little-endian u32 length
//! and a `bincode` body. One connection serves its requests in order; open several for
//! parallelism. A request that does not parse gets an error response, never a crash.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::coherence::NodeId;
use crate::fs::client::{RenameMode, SetAttr, StatFs, XattrMode};
use crate::fs::layout::{Entry, Inode};

/// Set in a block id of [`Response::Invalidate`] for a change this node's client made for
/// the CLI (`put`, `rm`, `mkdir`): no revoke waits for it, and an advisory data block
/// stands for the whole file (or, of a directory, for its bucket's names).
pub const ADVISORY: u64 = 1 << 63;

/// Largest frame (a `put` of a file carries the whole file).
pub const MAX_FRAME: usize = 1 << 30;

/// What a client asks a node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// The node's state.
    Status,
    /// Create or replace the file at `path` with `data`, then fsync it and its directory.
    Put {
        /// Absolute path in the file system.
        path: String,
        /// Content.
        data: Vec<u8>,
    },
    /// The content of the file at `path`.
    Get {
        /// Absolute path.
        path: String,
    },
    /// The entries of the directory at `path` (or the file itself).
    Ls {
        /// Absolute path.
        path: String,
    },
    /// Remove the file or empty directory at `path`.
    Rm {
        /// Absolute path.
        path: String,
    },
    /// Create a directory.
    Mkdir {
        /// Absolute path.
        path: String,
    },
    /// Rename `from` to `to` (replacing a file there), then fsync both directories.
    Rename {
        /// Absolute path.
        from: String,
        /// Absolute path.
        to: String,
    },
    /// Check this node's log (imap entries, fragments, parity) and, with `namespace`,
    /// the whole name space through this node's client; with `repair`, fix what is found
    /// ([`crate::fs::fsck`]).
    Fsck {
        /// Fix what is found.
        repair: bool,
        /// Also check the name space (one node does, for the cluster).
        namespace: bool,
    },
    /// One client-API call.
    Fs(FsOp),
    /// Write back and fsync everything this node's client wrote.
    Flush,
    /// Make the log durable and write a checkpoint.
    Checkpoint,
    /// Exit (after `Flush` and `Checkpoint` on every node: `xfs-node down`).
    Shutdown,
    /// Propose a membership change to the cluster's log (`xfs-node join`, `leave`);
    /// answered once proposed, applied once committed.
    Propose(crate::membership::Change),
    /// The FUSE front attaches: from now on the node asks it, on this connection, to drop
    /// the kernel's cached pages, attributes and names of blocks this node's client loses
    /// ([`Response::Invalidate`]), and it answers each with [`Request::KernelDone`]; the
    /// node acknowledges the revoke only then. One mount per node.
    Subscribe,
    /// The kernel dropped what it cached of these blocks.
    KernelDone(Vec<u64>),
    /// Mount the file system at `dir`, served in this node's process (a node run by
    /// `xfsam-mount --serve`, as `xfs-node up` starts them): answered once mounted. A node
    /// run by `xfs-node serve` cannot (ENOTSUP: mount it over the socket instead). One
    /// mount per node (EBUSY).
    Mount {
        /// The mount point (an existing, empty directory), absolute.
        dir: std::path::PathBuf,
        /// Let other users than the mounting one in.
        allow_other: bool,
        /// Mount read-only.
        read_only: bool,
    },
}

/// The client API by index number.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum FsOp {
    Lookup {
        parent: u64,
        name: Vec<u8>,
    },
    Getattr {
        ino: u64,
    },
    Create {
        parent: u64,
        name: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Mkdir {
        parent: u64,
        name: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// `open`: files a mount has open (kept until their last close if this was their
    /// last name: the answer is then `Ino` of the file, and the mount sends
    /// [`FsOp::Reclaim`] at its last close).
    Unlink {
        parent: u64,
        name: Vec<u8>,
        open: Vec<u64>,
    },
    /// Free a file with no name left (a mount closed it for the last time).
    Reclaim {
        ino: u64,
    },
    Rmdir {
        parent: u64,
        name: Vec<u8>,
    },
    Rename {
        sp: u64,
        sn: Vec<u8>,
        dp: u64,
        dn: Vec<u8>,
        mode: RenameMode,
        open: Vec<u64>,
    },
    Link {
        ino: u64,
        parent: u64,
        name: Vec<u8>,
    },
    Symlink {
        parent: u64,
        name: Vec<u8>,
        target: Vec<u8>,
        uid: u32,
        gid: u32,
    },
    Readlink {
        ino: u64,
    },
    Read {
        ino: u64,
        offset: u64,
        len: usize,
    },
    Write {
        ino: u64,
        offset: u64,
        data: Vec<u8>,
    },
    /// A write on a file opened with `O_APPEND`: at the file's coherent end, whatever
    /// offset the kernel chose; answered with [`Response::Appended`].
    Append {
        ino: u64,
        data: Vec<u8>,
    },
    /// `fallocate` without `KEEP_SIZE`: the size becomes at least `end`.
    Extend {
        ino: u64,
        end: u64,
    },
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: the range reads as zeros.
    PunchHole {
        ino: u64,
        offset: u64,
        len: u64,
    },
    Fsync {
        ino: u64,
    },
    Readdir {
        ino: u64,
    },
    Setattr {
        ino: u64,
        attr: SetAttr,
    },
    Statfs,
    Getxattr {
        ino: u64,
        name: Vec<u8>,
    },
    Setxattr {
        ino: u64,
        name: Vec<u8>,
        value: Vec<u8>,
        mode: XattrMode,
    },
    Listxattr {
        ino: u64,
    },
    Removexattr {
        ino: u64,
        name: Vec<u8>,
    },
    Root,
    Mknod {
        parent: u64,
        name: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u64,
    },
}

/// A node's state, for `xfs-node status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node id.
    pub node: u16,
    /// Roles.
    pub roles: Vec<String>,
    /// Process id.
    pub pid: u32,
    /// Every part started (shards, storage server, log recovered, root present).
    pub ready: bool,
    /// Configuration version.
    pub config_version: u64,
    /// Manager-map version.
    pub map_version: u64,
    /// Shard loops.
    pub shards: usize,
    /// Named counters (coherence, log, storage).
    pub counters: Vec<(String, u64)>,
    /// The membership: epoch, leader, voters, members, map versions.
    pub membership: crate::membership::MembershipStatus,
    /// Storage servers this node's log has marked down.
    pub servers_down: Vec<u16>,
    /// Storage: slots in use and total on this node's server.
    pub storage_used_bytes: u64,
    /// Storage: total bytes.
    pub storage_total_bytes: u64,
    /// The last protocol or storage error, if any.
    pub last_error: Option<String>,
    /// The stripe groups this node may lead the cleaner of: group id, the leader it
    /// sees, and the cleaner's state if it leads.
    pub cleaners: Vec<(
        u32,
        Option<u16>,
        Option<crate::storage::cleaner::CleanerStatus>,
    )>,
}

impl NodeStatus {
    /// A counter by name (0 if absent).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, v)| *v)
    }
}

/// A node's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum Response {
    Ok,
    Err {
        errno: i32,
        message: String,
    },
    Status(Box<NodeStatus>),
    Data(Vec<u8>),
    Attr(Box<Inode>),
    Entries(Vec<(Entry, Inode)>),
    Names(Vec<Vec<u8>>),
    StatFs(StatFs),
    Count(u64),
    Ino(u64),
    /// To a subscribed mount: drop what the kernel caches of these blocks.
    Invalidate(Vec<u64>),
    /// What [`Request::Fsck`] found.
    Fsck(Box<FsckResult>),
    /// Where an [`FsOp::Append`] landed: its offset (it wrote all its bytes).
    Appended(u64),
}

/// One node's answer to [`Request::Fsck`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FsckResult {
    /// The node.
    pub node: NodeId,
    /// The name space's check, if asked for.
    pub namespace: Option<crate::fs::fsck::FsckReport>,
    /// What the log check looked at (none if the node keeps no log).
    pub log: Option<crate::storage::log::LogCheck>,
    /// The log's problems.
    pub log_problems: Vec<String>,
}

/// Write one frame.
pub fn send<T: Serialize>(s: &mut impl Write, v: &T) -> std::io::Result<()> {
    let body = bincode::serialize(v).map_err(std::io::Error::other)?;
    s.write_all(&(body.len() as u32).to_le_bytes())?;
    s.write_all(&body)?;
    s.flush()
}

/// Read one frame (`Ok(None)` at a clean end of stream).
pub fn recv<T: for<'de> Deserialize<'de>>(s: &mut impl Read) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {MAX_FRAME}"),
        ));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    bincode::deserialize(&body)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Why a call on a node's control socket failed ([`Control`]).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket does not answer: the node is not running (or another path was given).
    #[error(
        "cannot reach the node's control socket {}: {source} (is the node running? \
         start it with `xfs-node up` or `xfs-node serve`)",
        path.display()
    )]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Sending the request or reading the answer failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The node closed the connection before it answered.
    #[error("{}: the node closed the connection", path.display())]
    Closed {
        /// The socket.
        path: PathBuf,
    },
    /// The node answered with an error ([`Response::Err`]; [`Control::call_ok`]).
    #[error("{message}")]
    Node {
        /// The errno the node reports.
        errno: i32,
        /// What failed.
        message: String,
    },
}

impl ControlError {
    /// The errno of an error answer ([`ControlError::Node`]); `None` when the node did not
    /// answer.
    pub fn errno(&self) -> Option<i32> {
        match self {
            ControlError::Node { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// A connection to a node's control socket.
pub struct Control {
    stream: UnixStream,
    path: PathBuf,
}

impl Control {
    /// Connect to the socket at `path`.
    pub fn connect(path: &Path) -> Result<Control, ControlError> {
        let stream = UnixStream::connect(path).map_err(|source| ControlError::Connect {
            path: path.to_owned(),
            source,
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(120))).ok();
        Ok(Control {
            stream,
            path: path.to_owned(),
        })
    }

    /// The underlying stream (the mount's invalidation stream reads and writes it).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Send a request and wait for the answer.
    pub fn call(&mut self, req: &Request) -> Result<Response, ControlError> {
        let io = |source| ControlError::Io {
            path: self.path.clone(),
            source,
        };
        send(&mut self.stream, req).map_err(io)?;
        match recv(&mut self.stream) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(ControlError::Closed {
                path: self.path.clone(),
            }),
            Err(e) => Err(io(e)),
        }
    }

    /// Call, turning an error response into `Err` ([`ControlError::Node`]).
    pub fn call_ok(&mut self, req: &Request) -> Result<Response, ControlError> {
        match self.call(req)? {
            Response::Err { errno, message } => Err(ControlError::Node { errno, message }),
            r => Ok(r),
        }
    }
}
