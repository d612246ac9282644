//! The CLI's path commands (`put`, `ls`) and the file-system operations of the control
//! socket ([`FsOp`]), run on the node's client.

use super::*;

/// The answer to an unlink or rename: the open file whose last name went, if any.
fn kept(ino: Option<u64>) -> Response {
    ino.map_or(Response::Ok, Response::Ino)
}

impl Node {
    pub(super) fn put(&self, path: &str, data: &[u8]) -> Result<(), Errno> {
        let c = &self.client;
        let (parent, name) = c.resolve_parent(path)?;
        let ino = match c.lookup(parent.ino, name.as_bytes()) {
            Ok(i) if i.kind == Some(Kind::Dir) => return Err(Errno::EISDIR),
            Ok(i) => {
                c.setattr(
                    i.ino,
                    &crate::fs::client::SetAttr {
                        size: Some(0),
                        ..Default::default()
                    },
                )?;
                i.ino
            }
            Err(Errno::ENOENT) => c.create(parent.ino, name.as_bytes(), 0o644, 0, 0)?.ino,
            Err(e) => return Err(e),
        };
        let written = data
            .chunks(1 << 20)
            .enumerate()
            .try_for_each(|(k, chunk)| c.write(ino, (k << 20) as u64, chunk).map(drop))
            .and_then(|_| {
                self.advise_path(parent.ino, name, Some(ino));
                c.fsync(ino)
            });
        if let Err(e) = written {
            // A put that failed (a full cluster) leaves no partial file behind: its blocks
            // become deletions, its waiting data is dropped, and its space is the cleaner's.
            if c.unlink(parent.ino, name.as_bytes()).is_ok() {
                let _ = c.fsync(ino).and_then(|_| c.fsync(parent.ino));
            }
            return Err(e);
        }
        c.fsync(parent.ino)
    }

    pub(super) fn ls(&self, path: &str) -> Result<Vec<(Entry, Inode)>, Errno> {
        let c = &self.client;
        let i = c.resolve(path)?;
        if i.kind != Some(Kind::Dir) {
            let name = path.rsplit('/').next().unwrap_or(path).as_bytes().to_vec();
            return Ok(vec![(
                Entry {
                    name,
                    ino: i.ino,
                    kind: i.kind.unwrap_or(Kind::File),
                },
                i,
            )]);
        }
        let mut out = c.readdir_plus(i.ino)?;
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        Ok(out)
    }

    /// Run a file-system operation of the control socket (a mount's request).
    pub(super) fn fs(&self, op: FsOp) -> Response {
        self.fs_op(op).unwrap_or_else(|e| Response::Err {
            errno: e.0,
            message: e.to_string(),
        })
    }

    /// [`Node::fs`]: one short arm per operation, each a call of the client.
    fn fs_op(&self, op: FsOp) -> Result<Response, Errno> {
        let c = &self.client;
        Ok(match op {
            FsOp::Root => Response::Ino(c.root()),
            FsOp::Mknod {
                parent,
                name,
                mode,
                uid,
                gid,
                rdev,
            } => Response::Attr(Box::new(c.make(
                parent,
                &name,
                mknod_kind(mode),
                mode,
                uid,
                gid,
                rdev,
                &[],
            )?)),
            FsOp::Lookup { parent, name } => Response::Attr(Box::new(c.lookup(parent, &name)?)),
            FsOp::Getattr { ino } => Response::Attr(Box::new(c.getattr(ino)?)),
            FsOp::Create {
                parent,
                name,
                mode,
                uid,
                gid,
            } => Response::Attr(Box::new(c.create(parent, &name, mode, uid, gid)?)),
            FsOp::Mkdir {
                parent,
                name,
                mode,
                uid,
                gid,
            } => Response::Attr(Box::new(c.mkdir(parent, &name, mode, uid, gid)?)),
            FsOp::Unlink { parent, name, open } => kept(c.unlink_keeping(parent, &name, &open)?),
            FsOp::Reclaim { ino } => {
                c.reclaim(ino)?;
                Response::Ok
            }
            FsOp::Rmdir { parent, name } => {
                c.rmdir(parent, &name)?;
                Response::Ok
            }
            FsOp::Rename {
                sp,
                sn,
                dp,
                dn,
                mode,
                open,
            } => kept(c.rename_keeping(sp, &sn, dp, &dn, mode, &open)?),
            FsOp::Link { ino, parent, name } => {
                Response::Attr(Box::new(c.link(ino, parent, &name)?))
            }
            FsOp::Symlink {
                parent,
                name,
                target,
                uid,
                gid,
            } => Response::Attr(Box::new(c.symlink(parent, &name, &target, uid, gid)?)),
            FsOp::Readlink { ino } => Response::Data(c.readlink(ino)?),
            FsOp::Read { ino, offset, len } => Response::Data(c.read(ino, offset, len)?),
            FsOp::Write { ino, offset, data } => {
                Response::Count(c.write(ino, offset, &data)? as u64)
            }
            FsOp::Append { ino, data } => Response::Appended(c.append(ino, &data)?),
            FsOp::Extend { ino, end } => {
                c.extend(ino, end)?;
                Response::Ok
            }
            FsOp::PunchHole { ino, offset, len } => {
                c.punch_hole(ino, offset, len)?;
                Response::Ok
            }
            FsOp::Fsync { ino } => {
                c.fsync(ino)?;
                Response::Ok
            }
            FsOp::Readdir { ino } => Response::Entries(c.readdir_plus(ino)?),
            FsOp::Setattr { ino, attr } => Response::Attr(Box::new(c.setattr(ino, &attr)?)),
            FsOp::Statfs => Response::StatFs(c.statfs()?),
            FsOp::Getxattr { ino, name } => Response::Data(c.getxattr(ino, &name)?),
            FsOp::Setxattr {
                ino,
                name,
                value,
                mode,
            } => {
                c.setxattr(ino, &name, &value, mode)?;
                Response::Ok
            }
            FsOp::Listxattr { ino } => Response::Names(c.listxattr(ino)?),
            FsOp::Removexattr { ino, name } => {
                c.removexattr(ino, &name)?;
                Response::Ok
            }
        })
    }
}

/// What `mknod` with `mode` makes: a regular file (its type bits, or none) or a special
/// file (the type bits kept in the mode).
fn mknod_kind(mode: u32) -> Kind {
    if mode & libc::S_IFMT == libc::S_IFREG || mode & libc::S_IFMT == 0 {
        Kind::File
    } else {
        Kind::Special
    }
}
