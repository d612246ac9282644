//! Mounting: the raw `mount(2)` of /dev/fuse, and where the mount's state file lives.

use super::*;

/// Mount a FUSE file system at `mountpoint` (root only): returns the `/dev/fuse` descriptor
/// to serve it on. The mount shows as type `fuse.xfsam` with source `fsname`.
pub fn mount_fuse(
    mountpoint: &Path,
    fsname: &str,
    allow_other: bool,
    read_only: bool,
) -> Result<OwnedFd, FrontError> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(FrontError::OpenDevice)?;
    let fd: OwnedFd = dev.into();
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid},default_permissions",
        fd.as_raw_fd()
    );
    if allow_other {
        data.push_str(",allow_other");
    }
    let c = |s: &[u8]| std::ffi::CString::new(s).map_err(|_| FrontError::NulInArgument);
    let src = c(fsname.as_bytes())?;
    let target = c(mountpoint.as_os_str().as_bytes())?;
    let fstype = c(b"fuse.xfsam")?;
    let data = c(data.as_bytes())?;
    let flags = if read_only { libc::MS_RDONLY } else { 0 };
    // SAFETY: every pointer is a live NUL-terminated string.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(FrontError::Mount {
            mountpoint: mountpoint.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(fd)
}

/// Where a mount of the node with control socket `control` keeps its state (pid, mount
/// point, counters): beside the socket.
pub fn state_path(control: &Path) -> PathBuf {
    let mut s = control.as_os_str().to_owned();
    s.push(".mount");
    PathBuf::from(s)
}

/// Where the kernel lists its FUSE connections (the `fusectl` file system).
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// The kernel's id of the FUSE connection mounted at `mountpoint` (ask only once the
/// session serves requests: it stats the mount point).
pub fn connection_of(mountpoint: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mountpoint)?.dev();
    Ok(u64::from(libc::minor(dev)))
}

/// Abort FUSE connection `conn` ([`connection_of`]): every request on it fails at once and
/// its session ends, even while a detached mount still has open files. Mounts `fusectl`
/// first if it is not.
pub fn abort_connection(conn: u64) -> std::io::Result<()> {
    let abort = Path::new(FUSECTL).join(conn.to_string()).join("abort");
    if !abort.exists() {
        let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
        let (src, target, fstype) = (c("fusectl"), c(FUSECTL), c("fusectl"));
        // SAFETY: every pointer is a live NUL-terminated string; no data argument.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) {
                return Err(e);
            }
        }
    }
    std::fs::write(&abort, "1")
}

/// The kernel's read-ahead for this mount's sequential reads, KiB: the kernel caps a FUSE
/// mount's read-ahead at its device default (128 KiB) whatever `max_readahead` the daemon
/// asks for at init; raised through the mount's `bdi` in sysfs.
pub const READ_AHEAD_KB: u32 = 1024;

/// Set the read-ahead of FUSE connection `conn` ([`connection_of`]) to [`READ_AHEAD_KB`].
pub fn raise_read_ahead(conn: u64) -> std::io::Result<()> {
    std::fs::write(
        format!("/sys/class/bdi/0:{conn}/read_ahead_kb"),
        READ_AHEAD_KB.to_string(),
    )
}
