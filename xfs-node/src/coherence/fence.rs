//! Fencing: which senders the manager and storage roles take messages from
//! ([`Fence`]), by the cluster's membership epoch.
//!
//! Every coherence message carries its sender's **epoch**: the newest membership change
//! the sender has applied. The cluster changes its membership (a node declared failed,
//! a node joining or leaving) by a committed entry of the replicated membership log, and
//! every change makes a new epoch. When a node is removed in epoch `e`, nothing it sent
//! stamped with an epoch before `e` may be taken any more: a node that stalled (SIGSTOP, a
//! pause, a partition) and comes back with its old cache and dirty blocks must not
//! overwrite what the survivors wrote and fsynced meanwhile.
//!
//! The rule ([`Fence::admit`]), checked by a node's manager and storage roles before their
//! state machines see a message:
//! * from a node the fence knows as removed: **refused**;
//! * stamped with an epoch before the one its sender's current incarnation joined (or was
//!   last confirmed) in: **refused** (the old incarnation's leftovers);
//! * stamped with an epoch newer than the fence's own: **held** until this node has
//!   applied that epoch (the sender may know of a removal this node has not yet heard of;
//!   taking its message first could let a removed node's write land after a newer one);
//! * otherwise: admitted. A member that merely lags behind other members' changes keeps
//!   being served.
//!
//! A node that was never named in a change (a static cluster, or before the first change)
//! is admitted at every epoch, so a cluster without a membership service behaves as before.

use super::*;

/// A membership epoch: the number of membership changes the cluster has committed.
pub type Epoch = u64;

/// What a role does with a message, by its sender and epoch ([`Fence::admit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Admit {
    /// Take it.
    Yes,
    /// Drop it (counted): its sender was removed, or this is an old incarnation's message.
    Refused,
    /// Keep it until this node has applied `epoch`.
    Later {
        /// The epoch the message was stamped with.
        epoch: Epoch,
    },
}

/// One node as the fence knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberFence {
    /// Whether the node is a member now.
    pub member: bool,
    /// The epoch of the node's last change (joined, removed, rejoined): a member's
    /// messages stamped before it are an older incarnation's.
    pub since: Epoch,
}

/// A node's view of the membership, as its manager and storage roles check senders by it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fence {
    /// The newest epoch this node has applied.
    pub epoch: Epoch,
    /// Nodes named by some change; a node absent here was never named and is admitted.
    pub nodes: BTreeMap<NodeId, MemberFence>,
}

impl Fence {
    /// What to do with a message from `from` stamped with `epoch`.
    pub fn admit(&self, from: NodeId, epoch: Epoch) -> Admit {
        if epoch > self.epoch {
            return Admit::Later { epoch };
        }
        match self.nodes.get(&from) {
            None => Admit::Yes,
            Some(m) if m.member && epoch >= m.since => Admit::Yes,
            Some(_) => Admit::Refused,
        }
    }

    /// The cluster removed `node` in `epoch` (a newer epoch than this fence's).
    pub fn removed(&mut self, node: NodeId, epoch: Epoch) {
        self.change(node, false, epoch);
    }

    /// `node` (re)joined in `epoch`, as a new incarnation: what an older incarnation sent is
    /// refused from now on.
    pub fn joined(&mut self, node: NodeId, epoch: Epoch) {
        self.change(node, true, epoch);
    }

    /// Whether `node` is a member (a node never named is).
    pub fn is_member(&self, node: NodeId) -> bool {
        self.nodes.get(&node).is_none_or(|m| m.member)
    }

    fn change(&mut self, node: NodeId, member: bool, epoch: Epoch) {
        self.epoch = self.epoch.max(epoch);
        self.nodes.insert(
            node,
            MemberFence {
                member,
                since: epoch,
            },
        );
    }
}

#[cfg(test)]
mod fence_tests {
    use super::*;

    #[test]
    fn a_static_cluster_admits_everyone() {
        let f = Fence::default();
        assert_eq!(f.admit(3, 0), Admit::Yes);
        assert!(f.is_member(3));
    }

    #[test]
    fn a_removed_node_is_refused_at_every_epoch_until_it_rejoins() {
        let mut f = Fence::default();
        f.removed(2, 1);
        assert_eq!(f.epoch, 1);
        assert_eq!(f.admit(2, 0), Admit::Refused, "its old messages");
        assert_eq!(
            f.admit(2, 1),
            Admit::Refused,
            "even if it heard of its removal"
        );
        assert_eq!(
            f.admit(1, 0),
            Admit::Yes,
            "a lagging member is still served"
        );
        assert!(!f.is_member(2));
        f.joined(2, 3);
        assert_eq!(f.epoch, 3);
        assert_eq!(
            f.admit(2, 1),
            Admit::Refused,
            "the old incarnation's leftovers"
        );
        assert_eq!(f.admit(2, 3), Admit::Yes, "the new incarnation");
        assert!(f.is_member(2));
    }

    #[test]
    fn a_message_from_a_newer_epoch_waits_for_this_node_to_catch_up() {
        let mut f = Fence::default();
        assert_eq!(f.admit(1, 2), Admit::Later { epoch: 2 });
        f.removed(4, 2);
        assert_eq!(f.admit(1, 2), Admit::Yes);
    }
}
