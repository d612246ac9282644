//! Extended attributes, kept in the inode's xattr blocks.

use super::*;

impl<B: Blocks> FsClient<B> {
    /// `getxattr`.
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>, Errno> {
        let i = self.getattr(ino)?;
        i.xattrs
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .ok_or(Errno::ENODATA)
    }

    /// `listxattr`.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, Errno> {
        Ok(self
            .getattr(ino)?
            .xattrs
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    /// `setxattr`.
    pub fn setxattr(
        &self,
        ino: u64,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
    ) -> Result<(), Errno> {
        if name.is_empty() || name.len() > 255 {
            return Err(Errno::ERANGE);
        }
        let i = self.getattr(ino)?;
        let exists = i.xattrs.iter().any(|(k, _)| k == name);
        match mode {
            XattrMode::Create if exists => return Err(Errno::EEXIST),
            XattrMode::Replace if !exists => return Err(Errno::ENODATA),
            _ => {}
        }
        let mut probe = i.clone();
        probe.xattrs.push((name.to_vec(), value.to_vec()));
        if probe.encode().len() > crate::fs::layout::MAX_INODE {
            return Err(Errno::ENOSPC);
        }
        let now = self.blocks.now();
        self.update(
            inode_block(ino),
            &[
                Op::Xattr {
                    name: name.to_vec(),
                    value: Some(value.to_vec()),
                },
                set(field::CTIME, now),
            ],
        )?;
        Ok(())
    }

    /// `removexattr`.
    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<(), Errno> {
        let i = self.getattr(ino)?;
        if !i.xattrs.iter().any(|(k, _)| k == name) {
            return Err(Errno::ENODATA);
        }
        let now = self.blocks.now();
        self.update(
            inode_block(ino),
            &[
                Op::Xattr {
                    name: name.to_vec(),
                    value: None,
                },
                set(field::CTIME, now),
            ],
        )?;
        Ok(())
    }
}
