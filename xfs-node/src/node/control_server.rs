//! The control socket's server: one thread per connection running the client API
//! ([`Node::serve`], `handle`), and the stream of kernel invalidations to an attached mount
//! (`mount_stream`).

use super::*;

impl Node {
    /// Serve the control socket at the configured path until a `Shutdown` request or
    /// `stop` is set; a background thread makes the log durable every few seconds.
    pub fn serve(self: Arc<Self>) -> Result<(), ServeError> {
        let path = self
            .config
            .node(self.id)
            .map(|n| n.control.clone())
            .ok_or(ServeError::NoControlPath(self.id))?;
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).ok();
        }
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|source| ServeError::Bind {
            path: path.clone(),
            source,
        })?;
        listener.set_nonblocking(true).ok();
        let bg = self.clone();
        spawn_named("log-sync", move || {
            let mut n = 0u64;
            while !bg.stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                n += 1;
                if n.is_multiple_of(5) {
                    if let Err(e) = bg.sync_log(n.is_multiple_of(60)) {
                        eprintln!("xfs-node {}: background log sync: {e}", bg.id);
                    }
                }
            }
        });
        while !self.stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).ok();
                    let node = self.clone();
                    spawn_named("control", move || node.connection(stream));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(ServeError::Accept(e)),
            }
        }
        let _ = std::fs::remove_file(&path);
        Ok(())
    }

    pub(super) fn connection(&self, mut stream: std::os::unix::net::UnixStream) {
        loop {
            let req: Request = match control::recv(&mut stream) {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    let _ = control::send(
                        &mut stream,
                        &Response::Err {
                            errno: libc::EINVAL,
                            message: format!("bad request: {e}"),
                        },
                    );
                    return;
                }
            };
            if matches!(req, Request::Subscribe) {
                return self.mount_stream(stream);
            }
            if matches!(req, Request::Fs(_)) {
                self.socket_fs_requests.fetch_add(1, Ordering::Relaxed);
            }
            let shutdown = matches!(req, Request::Shutdown);
            let resp = self.request(req);
            let _ = control::send(&mut stream, &resp);
            if shutdown {
                self.stop.store(true, Ordering::Relaxed);
                return;
            }
        }
    }

    /// A mount in another process attached: send it the shards' kernel invalidations on
    /// `stream` and route its answers back; when it goes away, whatever it had not
    /// answered completes (the attachment's drop).
    pub(super) fn mount_stream(&self, mut stream: std::os::unix::net::UnixStream) {
        let attached = match self.attach_mount() {
            Ok(a) => a,
            Err(e) => {
                let _ = control::send(
                    &mut stream,
                    &Response::Err {
                        errno: libc::EBUSY,
                        message: e.to_string(),
                    },
                );
                return;
            }
        };
        let _ = control::send(&mut stream, &Response::Ok);
        let gone = Arc::new(AtomicBool::new(false));
        let reader = stream.try_clone().ok().map(|mut r| {
            let answers = attached.answers();
            let gone = gone.clone();
            std::thread::spawn(move || {
                while let Ok(Some(Request::KernelDone(blocks))) = control::recv(&mut r) {
                    answers.kernel_done(blocks);
                }
                gone.store(true, Ordering::Relaxed);
            })
        });
        while reader.is_some()
            && !gone.load(Ordering::Relaxed)
            && !self.stop.load(Ordering::Relaxed)
        {
            match attached.recv_timeout(Duration::from_millis(100)) {
                Ok(blocks) => {
                    if control::send(&mut stream, &Response::Invalidate(blocks)).is_err() {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = stream.shutdown(std::net::Shutdown::Both);
        if let Some(r) = reader {
            let _ = r.join();
        }
        drop(attached);
    }

    /// Tell the attached mount (if any) that this node's client changed these blocks for
    /// the CLI: its kernel did not see the change and no revoke will tell it.
    pub(super) fn advise(&self, blocks: &[BlockId]) {
        if let Some(tx) = lock(&self.mount).as_ref() {
            let _ = tx.try_send(blocks.iter().map(|b| b | control::ADVISORY).collect());
        }
    }

    /// The blocks a CLI change of `name` in `parent` touched: the entry's bucket and the
    /// parent's inode, and (`ino`) the file's inode and data.
    pub(super) fn advise_path(&self, parent: u64, name: &str, ino: Option<u64>) {
        use crate::fs::layout::{block_id, bucket_of, inode_block};
        let mut v = vec![
            block_id(parent, bucket_of(name.as_bytes())),
            inode_block(parent),
        ];
        if let Some(i) = ino {
            v.push(inode_block(i));
            v.push(block_id(i, 0));
        }
        self.advise(&v);
    }

    /// Answer one control request (what a control-socket connection does for each of
    /// its requests; a mount in this process calls it directly). `Subscribe` is refused
    /// here: a mount in this process attaches with [`Node::attach_mount`].
    pub fn request(&self, req: Request) -> Response {
        let c = &self.client;
        match req {
            Request::Status => Response::Status(Box::new(self.status())),
            Request::Put { path, data } => match self.put(&path, &data) {
                Ok(()) => Response::Ok,
                Err(e) => err(e, &path),
            },
            Request::Get { path } => match self.get(&path) {
                Ok(d) => Response::Data(d),
                Err(e) => err(e, &path),
            },
            Request::Ls { path } => match self.ls(&path) {
                Ok(v) => Response::Entries(v),
                Err(e) => err(e, &path),
            },
            Request::Rm { path } => match self.rm(&path) {
                Ok(()) => Response::Ok,
                Err(e) => err(e, &path),
            },
            Request::Mkdir { path } => match self.mkdir(&path) {
                Ok(()) => Response::Ok,
                Err(e) => err(e, &path),
            },
            Request::Rename { from, to } => match self.rename(&from, &to) {
                Ok(()) => Response::Ok,
                Err(e) => err(e, &format!("{from} -> {to}")),
            },
            Request::Fsck { repair, namespace } => self.fsck(repair, namespace),
            Request::Fs(op) => self.fs(op),
            Request::Flush => match c.sync_all() {
                Ok(()) => Response::Ok,
                Err(e) => err(e, "flush"),
            },
            Request::Checkpoint => self.checkpoint(),
            Request::Shutdown => Response::Ok,
            Request::Propose(change) => match self.propose(change) {
                Ok(()) => Response::Ok,
                Err(message) => Response::Err {
                    errno: libc::EAGAIN,
                    message,
                },
            },
            Request::Mount {
                dir,
                allow_other,
                read_only,
            } => match self.mounter.get() {
                Some(mount) => {
                    let flags = MountFlags {
                        allow_other,
                        read_only,
                    };
                    match mount(&dir, flags) {
                        Ok(()) => Response::Ok,
                        Err((errno, message)) => Response::Err { errno, message },
                    }
                }
                None => Response::Err {
                    errno: libc::ENOTSUP,
                    message: format!(
                        "node {} runs as `xfs-node serve` and cannot serve a mount in its \
                         process: mount it over its control socket (`xfs-node mount --socket`)",
                        self.id
                    ),
                },
            },
            Request::Subscribe | Request::KernelDone(_) => Response::Err {
                errno: libc::EINVAL,
                message: "Subscribe opens a connection of its own; KernelDone answers on it".into(),
            },
        }
    }

    /// `get`: the whole file at `path`.
    fn get(&self, path: &str) -> Result<Vec<u8>, Errno> {
        let c = &self.client;
        let i = c.resolve(path)?;
        if i.kind == Some(Kind::Dir) {
            return Err(Errno::EISDIR);
        }
        c.read(i.ino, 0, i.size as usize)
    }

    /// `rm`: remove the file or empty directory at `path`, durably.
    fn rm(&self, path: &str) -> Result<(), Errno> {
        let c = &self.client;
        let (p, name) = c.resolve_parent(path)?;
        let victim = c.lookup(p.ino, name.as_bytes())?;
        match victim.kind {
            Some(Kind::Dir) => c.rmdir(p.ino, name.as_bytes())?,
            _ => c.unlink(p.ino, name.as_bytes())?,
        }
        self.advise_path(p.ino, name, Some(victim.ino));
        c.fsync(p.ino)
    }

    /// `mkdir`: make the directory `path`, durably.
    fn mkdir(&self, path: &str) -> Result<(), Errno> {
        let c = &self.client;
        let (p, name) = c.resolve_parent(path)?;
        c.mkdir(p.ino, name.as_bytes(), 0o755, 0, 0)?;
        self.advise_path(p.ino, name, None);
        c.fsync(p.ino)
    }

    /// `mv`: rename `from` to `to` (replacing a file there), durably.
    fn rename(&self, from: &str, to: &str) -> Result<(), Errno> {
        let c = &self.client;
        let (sp, sn) = c.resolve_parent(from)?;
        let (dp, dn) = c.resolve_parent(to)?;
        let moved = c.lookup(sp.ino, sn.as_bytes())?.ino;
        c.rename(
            sp.ino,
            sn.as_bytes(),
            dp.ino,
            dn.as_bytes(),
            crate::fs::client::RenameMode::Replace,
        )?;
        self.advise_path(sp.ino, sn, Some(moved));
        self.advise_path(dp.ino, dn, Some(moved));
        c.fsync(moved)?;
        c.fsync(sp.ino)?;
        c.fsync(dp.ino)
    }

    /// `fsck`: the name space's (if `namespace`) and the log's checks.
    fn fsck(&self, repair: bool, namespace: bool) -> Response {
        let ns = if namespace {
            match crate::fs::fsck::fsck(&self.client, repair) {
                Ok(r) => Some(r),
                Err(e) => return err(e, "fsck of the name space"),
            }
        } else {
            None
        };
        let (log, log_problems) = match (self.log_check)(repair) {
            Some((k, p)) => (Some(k), p),
            None => (None, Vec::new()),
        };
        Response::Fsck(Box::new(control::FsckResult {
            node: self.id,
            namespace: ns,
            log,
            log_problems,
        }))
    }

    /// Write back every dirty block, then checkpoint the log.
    fn checkpoint(&self) -> Response {
        // What the cache cannot write (the stores are full) is not acknowledged;
        // what is durable is checkpointed all the same (the log keeps room for it).
        let flushed = self.client.sync_all();
        match (self.sync_log(true), flushed) {
            (Ok(()), Ok(())) => Response::Ok,
            (Ok(()), Err(e)) => err(e, "flush (checkpoint written)"),
            (Err(e), _) => Response::Err {
                errno: libc::EIO,
                message: format!("checkpoint: {e}"),
            },
        }
    }
}

/// The error answer to a request about `what`.
fn err(e: Errno, what: &str) -> Response {
    Response::Err {
        errno: e.0,
        message: format!("{what}: {e}"),
    }
}
