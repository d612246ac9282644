//! The errors of mounting and of reaching the node ([`FrontError`]).

use super::*;

/// Why the front could not reach its node, or could not mount.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    /// The node could not be reached, or answered with an error: its message.
    #[error("{0}")]
    Node(String),
    /// The node answered with something other than the request's answer.
    #[error("unexpected answer {0:?}")]
    Unexpected(Box<Response>),
    /// `/dev/fuse` could not be opened.
    #[error("cannot open /dev/fuse: {0} (load the fuse module: modprobe fuse)")]
    OpenDevice(#[source] std::io::Error),
    /// The mount point, the file system's name or the mount options hold a NUL byte.
    #[error("a NUL byte in a mount argument")]
    NulInArgument,
    /// `mount(2)` failed.
    #[error("cannot mount at {}: {source}{}", mountpoint.display(), mount_hint(source))]
    Mount {
        /// Where.
        mountpoint: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl FrontError {
    /// A failure of the node's control connection (whatever error type `xfs-node` gives).
    pub(crate) fn node(e: impl std::fmt::Display) -> FrontError {
        FrontError::Node(e.to_string())
    }
}

/// What to do about a failed `mount(2)`, for the errors that have an obvious cause.
fn mount_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) => " (mounting needs root)",
        Some(libc::EBUSY) => " (something is mounted there already)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_those_the_mount_command_printed() {
        let e = FrontError::Mount {
            mountpoint: PathBuf::from("/mnt/x"),
            source: std::io::Error::from_raw_os_error(libc::EBUSY),
        };
        let io = std::io::Error::from_raw_os_error(libc::EBUSY);
        assert_eq!(
            e.to_string(),
            format!("cannot mount at /mnt/x: {io} (something is mounted there already)")
        );
        let e = FrontError::Unexpected(Box::new(Response::Ok));
        assert_eq!(e.to_string(), "unexpected answer Ok");
        assert_eq!(FrontError::node("gone").to_string(), "gone");
        assert_eq!(
            FrontError::NulInArgument.to_string(),
            "a NUL byte in a mount argument"
        );
    }
}
