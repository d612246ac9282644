//! The replicated state: who is a member, which node manages which slice of the index
//! numbers, which servers hold each stripe group, and the epoch ([`ClusterMap`]). Every
//! node applies the same committed [`Change`]s in the same order, so every node computes
//! the same map.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::coherence::{Epoch, Fence, MemberFence, NodeId};

/// A membership change, proposed to the log and applied once committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// `node` starts (again) as `incarnation` (a number that grows with each start: a
    /// node removed while it stalled rejoins as a new one).
    Join {
        /// The node.
        node: NodeId,
        /// Its incarnation.
        incarnation: u64,
    },
    /// `node`'s `incarnation` is declared failed (proposed by a node that found it
    /// unreachable; applied only if that incarnation is still the member).
    Fail {
        /// The node.
        node: NodeId,
        /// The incarnation found unreachable.
        incarnation: u64,
    },
    /// `node` leaves the cluster (an operator's `xfs-node leave`).
    Leave {
        /// The node.
        node: NodeId,
    },
    /// `node` takes slot `slot` of stripe group `group` (a replacement for a dead server,
    /// rebuilt from parity).
    ReplaceServer {
        /// The stripe group.
        group: usize,
        /// The slot in the group.
        slot: usize,
        /// The new server.
        node: NodeId,
    },
}

/// Whether a node is a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// A member.
    Active,
    /// Declared failed by the cluster (fenced until it rejoins).
    Failed,
    /// Left by an operator's request.
    Left,
}

/// One node in the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its current incarnation.
    pub incarnation: u64,
    /// Member or not.
    pub state: MemberState,
    /// The epoch of its last change (0: a founding member never changed).
    pub since: Epoch,
}

/// The cluster's replicated state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// The number of effective changes applied.
    pub epoch: Epoch,
    /// Every node ever named.
    pub members: BTreeMap<NodeId, Member>,
    /// Per manager slot, the node the configuration gives it to (its home).
    pub homes: Vec<NodeId>,
    /// Per manager slot, the node that manages it now: its home while the home is a
    /// member, else a member chosen by the slot number.
    pub managers: Vec<NodeId>,
    /// The epoch of the last change to `managers`.
    pub managers_epoch: Epoch,
    /// The servers of each stripe group.
    pub stripe_groups: Vec<Vec<NodeId>>,
    /// The epoch of the last change to `stripe_groups`.
    pub stripe_groups_epoch: Epoch,
}

impl ClusterMap {
    /// The map a cluster starts with: every node of `nodes` a member (incarnation 0),
    /// manager slot i at `homes[i]`, the stripe groups as configured.
    pub fn new(nodes: &[NodeId], homes: Vec<NodeId>, stripe_groups: Vec<Vec<NodeId>>) -> Self {
        let members = nodes
            .iter()
            .map(|n| {
                (
                    *n,
                    Member {
                        incarnation: 0,
                        state: MemberState::Active,
                        since: 0,
                    },
                )
            })
            .collect();
        ClusterMap {
            epoch: 0,
            members,
            managers: homes.clone(),
            homes,
            managers_epoch: 0,
            stripe_groups,
            stripe_groups_epoch: 0,
        }
    }

    /// Whether `node` is a member now.
    pub fn is_member(&self, node: NodeId) -> bool {
        self.members
            .get(&node)
            .is_some_and(|m| m.state == MemberState::Active)
    }

    /// The members, in node order.
    pub fn active(&self) -> Vec<NodeId> {
        self.members
            .iter()
            .filter(|(_, m)| m.state == MemberState::Active)
            .map(|(n, _)| *n)
            .collect()
    }

    /// Apply a committed change. `true` if it changed the map (a new epoch); a stale or
    /// repeated change (a failure of an incarnation that already rejoined or was already
    /// declared, a join of an incarnation no newer than the member's) changes nothing.
    pub fn apply(&mut self, change: &Change) -> bool {
        let epoch = self.epoch + 1;
        match *change {
            Change::Join { node, incarnation } => {
                if let Some(m) = self.members.get(&node) {
                    let newer = incarnation > m.incarnation;
                    let back = m.state != MemberState::Active && incarnation >= m.incarnation;
                    if !(newer || back) {
                        return false;
                    }
                }
                self.members.insert(
                    node,
                    Member {
                        incarnation,
                        state: MemberState::Active,
                        since: epoch,
                    },
                );
            }
            Change::Fail { node, incarnation } => match self.members.get_mut(&node) {
                Some(m) if m.state == MemberState::Active && m.incarnation == incarnation => {
                    m.state = MemberState::Failed;
                    m.since = epoch;
                }
                _ => return false,
            },
            Change::Leave { node } => match self.members.get_mut(&node) {
                Some(m) if m.state == MemberState::Active => {
                    m.state = MemberState::Left;
                    m.since = epoch;
                }
                _ => return false,
            },
            Change::ReplaceServer { group, slot, node } => {
                let Some(at) = self
                    .stripe_groups
                    .get_mut(group)
                    .and_then(|g| g.get_mut(slot))
                else {
                    return false;
                };
                if *at == node
                    || !self
                        .members
                        .get(&node)
                        .is_some_and(|m| m.state == MemberState::Active)
                {
                    return false;
                }
                *at = node;
                self.stripe_groups_epoch = epoch;
            }
        }
        self.epoch = epoch;
        self.place_managers();
        true
    }

    /// Each manager slot at its home while the home is a member, else at a member chosen
    /// by the home's number (the same on every node): every slot of one home goes to one
    /// member, because the blocks of a home's slots live in the home's log, which one node
    /// at a time takes over.
    fn place_managers(&mut self) {
        let active = self.active();
        if active.is_empty() {
            return;
        }
        // Only nodes with the manager role (those that are some slot's home) take slots;
        // a member that holds a failed home's slots keeps them while it is a member (a log
        // moves between live nodes only when its home comes back).
        let candidates: Vec<NodeId> = active
            .iter()
            .copied()
            .filter(|n| self.homes.contains(n))
            .collect();
        if candidates.is_empty() {
            return;
        }
        let managers: Vec<NodeId> = self
            .homes
            .iter()
            .zip(&self.managers)
            .map(|(home, now)| {
                if self.is_member(*home) {
                    *home
                } else if *now != *home && candidates.contains(now) {
                    *now
                } else {
                    candidates[*home as usize % candidates.len()]
                }
            })
            .collect();
        if managers != self.managers {
            self.managers = managers;
            self.managers_epoch = self.epoch;
        }
    }

    /// The fence the manager and storage roles check senders by (`coherence::Fence`).
    pub fn fence(&self) -> Fence {
        Fence {
            epoch: self.epoch,
            nodes: self
                .members
                .iter()
                .map(|(n, m)| {
                    (
                        *n,
                        MemberFence {
                            member: m.state == MemberState::Active,
                            since: m.since,
                        },
                    )
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coherence::Admit;

    fn three() -> ClusterMap {
        ClusterMap::new(&[1, 2, 3], vec![1, 2, 3, 1, 2, 3], vec![vec![1, 2, 3]])
    }

    #[test]
    fn a_failure_moves_the_failed_nodes_slots_to_members_and_fences_it() {
        let mut m = three();
        assert!(m.apply(&Change::Fail {
            node: 2,
            incarnation: 0
        }));
        assert_eq!(m.epoch, 1);
        assert!(!m.is_member(2));
        assert!(m.managers.iter().all(|n| *n != 2), "{:?}", m.managers);
        assert_eq!(m.managers[0], 1, "slots of members stay home");
        assert_eq!(
            m.managers[1], m.managers[4],
            "one member takes all of a home's slots"
        );
        assert_eq!(m.managers_epoch, 1);
        let f = m.fence();
        assert_eq!(f.admit(2, 0), Admit::Refused);
        assert_eq!(f.admit(1, 0), Admit::Yes);
    }

    #[test]
    fn a_failed_homes_slots_stay_with_the_member_that_took_them_while_it_is_a_member() {
        let mut m = ClusterMap::new(&[1, 2, 3, 4], vec![1, 2, 3, 4], vec![vec![1, 2, 3, 4]]);
        let fail = |n: NodeId| Change::Fail {
            node: n,
            incarnation: 0,
        };
        assert!(m.apply(&fail(3)));
        let holder = m.managers[2];
        assert_ne!(holder, 3);
        // Another failure does not move node 3's log between the living.
        let other = [1, 2, 4].into_iter().find(|n| *n != holder).unwrap();
        assert!(m.apply(&fail(other)));
        assert_eq!(
            m.managers[2], holder,
            "node 3's slot moved between live members"
        );
        assert!(m.is_member(m.managers[other as usize - 1]));
        // The holder fails too: the slot moves to a member.
        assert!(m.apply(&fail(holder)));
        assert!(m.is_member(m.managers[2]));
        // A node without the manager role (no home slot) never takes one.
        let mut m = ClusterMap::new(&[1, 2, 3, 9], vec![1, 2, 3], vec![vec![1, 2, 3, 9]]);
        assert!(m.apply(&fail(1)));
        assert!(m.apply(&fail(2)));
        assert_eq!(m.managers, vec![3, 3, 3]);
    }

    #[test]
    fn stale_and_repeated_changes_change_nothing() {
        let mut m = three();
        assert!(m.apply(&Change::Fail {
            node: 2,
            incarnation: 0
        }));
        let before = m.clone();
        assert!(!m.apply(&Change::Fail {
            node: 2,
            incarnation: 0
        }));
        assert!(!m.apply(&Change::Leave { node: 2 }));
        assert_eq!(m, before);
        assert!(m.apply(&Change::Join {
            node: 2,
            incarnation: 1
        }));
        assert_eq!(m.managers, m.homes, "the slots go home");
        // The old incarnation's failure, proposed late, no longer applies.
        assert!(!m.apply(&Change::Fail {
            node: 2,
            incarnation: 0
        }));
        assert!(m.is_member(2));
        let f = m.fence();
        assert_eq!(
            f.admit(2, 1),
            Admit::Refused,
            "the old incarnation's messages"
        );
        assert_eq!(f.admit(2, 2), Admit::Yes);
    }

    #[test]
    fn a_replacement_server_takes_its_slot() {
        let mut m = three();
        assert!(m.apply(&Change::Join {
            node: 4,
            incarnation: 0
        }));
        assert!(m.apply(&Change::ReplaceServer {
            group: 0,
            slot: 1,
            node: 4
        }));
        assert_eq!(m.stripe_groups, vec![vec![1, 4, 3]]);
        assert_eq!(m.stripe_groups_epoch, 2);
        assert!(!m.apply(&Change::ReplaceServer {
            group: 3,
            slot: 0,
            node: 4
        }));
    }
}
