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
