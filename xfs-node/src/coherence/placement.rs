//! Where a block's roles live: its manager and its storage node, by the block's index number
//! ([`Placement`]).

use super::*;

/// Where a block's manager and storage server live. Same on every node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Placement {
    /// Manager nodes; a block's manager is chosen by a hash of its id.
    pub managers: Vec<NodeId>,
    /// Storage nodes; likewise.
    pub storages: Vec<NodeId>,
    /// When set, the file system's manager map: a block's manager is
    /// `managers[(block >> shift) % managers.len()]` (the bits of its index number), and its
    /// storage role runs on the same node (the node whose log holds the block). `None`:
    /// both by a hash of the block id (the model and the block-level simulation).
    pub index_shift: Option<u32>,
}

/// A 64-bit mix (splitmix64's finaliser): spreads block ids over managers and shards.
pub fn mix(block: BlockId) -> u64 {
    am_core::engine::splitmix(block)
}

impl Placement {
    /// The block's manager slot (its index into `managers`).
    pub fn slot(&self, block: BlockId) -> usize {
        let n = self.managers.len().max(1) as u64;
        match self.index_shift {
            Some(shift) => ((block >> shift) % n) as usize,
            None => (mix(block) % n) as usize,
        }
    }
    /// The block's manager.
    pub fn manager(&self, block: BlockId) -> NodeId {
        self.managers[self.slot(block)]
    }
    /// The block's storage server.
    pub fn storage(&self, block: BlockId) -> NodeId {
        match self.index_shift {
            Some(_) => self.manager(block),
            None => self.storages[((mix(block) >> 20) % self.storages.len() as u64) as usize],
        }
    }
}
