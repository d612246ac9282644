//! Test helpers shared by the storage tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// A loop device over a file in /var/tmp (not /tmp: tmpfs refuses O_DIRECT), with direct
/// IO, detached and removed when dropped. Needs root and `losetup`; fails with the hint.
pub(crate) struct LoopDevice {
    /// The device, e.g. /dev/loop3.
    pub(crate) dev: String,
    file: PathBuf,
}

impl LoopDevice {
    pub(crate) fn new(name: &str, bytes: u64) -> LoopDevice {
        let file = PathBuf::from(format!(
            "/var/tmp/xfs-node-{name}-{}.img",
            std::process::id()
        ));
        std::fs::write(&file, b"").unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(&file)
            .output()
            .unwrap_or_else(|e| {
                panic!("losetup: {e}: install util-linux (apt-get install mount) and run as root")
            });
        assert!(
            out.status.success(),
            "losetup failed ({}): the loop-device tests need root and /dev/loop-control",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        LoopDevice {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            file,
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        let _ = std::fs::remove_file(&self.file);
    }
}
