//! Attributes in the kernel's terms: times, file types, access checks, `lseek`'s data and
//! holes, xattr replies.

use super::*;

pub(crate) fn time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

pub(crate) fn ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

pub(crate) fn now() -> u64 {
    ns(SystemTime::now())
}

pub(crate) fn file_type(i: &Inode) -> FileType {
    match i.mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

pub(crate) fn kind_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::File => FileType::RegularFile,
        // The entry does not say which; readdir's type is a hint (DT_UNKNOWN would do).
        Kind::Special => FileType::RegularFile,
    }
}

pub(crate) fn time_or_now(t: Option<TimeOrNow>) -> Option<u64> {
    t.map(|t| match t {
        TimeOrNow::SpecificTime(s) => ns(s),
        TimeOrNow::Now => now(),
    })
}

pub(crate) fn xattr_reply(v: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(v.len() as u32)
    } else if v.len() > size as usize {
        reply.error(Errno::ERANGE)
    } else {
        reply.data(v)
    }
}

/// Whether `uid`/`gid` may access `i` for `mask` (R=4, W=2, X=1), as `access(2)`.
pub fn may_access(i: &Inode, uid: u32, gid: u32, mask: u32) -> bool {
    if uid == 0 {
        // Root may do anything but execute a file without any execute bit.
        return mask & 1 == 0 || i.mode & libc::S_IFMT == libc::S_IFDIR || i.mode & 0o111 != 0;
    }
    let bits = if uid == i.uid {
        (i.mode >> 6) & 7
    } else if gid == i.gid {
        (i.mode >> 3) & 7
    } else {
        i.mode & 7
    };
    bits & mask == mask
}

/// `SEEK_DATA` / `SEEK_HOLE` from the inode's extents (a superset of the written blocks:
/// a hole may read as data, never the reverse).
pub fn seek(i: &Inode, offset: i64, whence: i32) -> Result<i64, Errno> {
    if offset < 0 {
        return Err(Errno::EINVAL);
    }
    let off = offset as u64;
    let bs = BLOCK as u64;
    match whence {
        libc::SEEK_DATA | libc::SEEK_HOLE if off >= i.size => Err(Errno::ENXIO),
        libc::SEEK_DATA => {
            for (s, e) in &i.extents {
                if e * bs > off {
                    let at = (s * bs).max(off);
                    return if at < i.size {
                        Ok(at as i64)
                    } else {
                        Err(Errno::ENXIO)
                    };
                }
            }
            Err(Errno::ENXIO)
        }
        libc::SEEK_HOLE => {
            let mut at = off;
            for (s, e) in &i.extents {
                if s * bs <= at && at < e * bs {
                    at = e * bs;
                }
            }
            Ok(at.min(i.size) as i64)
        }
        libc::SEEK_SET => Ok(offset),
        _ => Err(Errno::EINVAL),
    }
}
