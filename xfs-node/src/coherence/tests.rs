//! Unit tests of the three machines driven together.

use super::*;

const M: NodeId = 10;
const S: NodeId = 11;

fn placement() -> Placement {
    Placement {
        managers: vec![M],
        storages: vec![S],
        index_shift: None,
    }
}

fn client(me: NodeId) -> ClientShard<u64> {
    ClientShard::new(me, ProtocolConfig::default(), placement(), 0)
}

fn sends(out: &mut Vec<Output<u64>>) -> Vec<(NodeId, Msg<u64>)> {
    out.drain(..)
        .filter_map(|o| match o {
            Output::Send { to, msg } => Some((to, msg)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_read_miss_is_served_by_storage_then_by_the_caching_peer() {
    let mut m = ManagerShard::new(M, ProtocolConfig::default(), placement(), vec![1, 2]);
    let mut out = Vec::new();
    m.receive::<u64>(1, Msg::ReadReq { block: 9 }, &mut out)
        .unwrap();
    assert_eq!(
        sends(&mut out),
        vec![(
            S,
            Msg::Fetch {
                block: 9,
                to: 1,
                seq: 0,
                exclusive: false
            }
        )]
    );
    m.receive::<u64>(2, Msg::ReadReq { block: 9 }, &mut out)
        .unwrap();
    assert_eq!(
        sends(&mut out),
        vec![(
            1,
            Msg::Forward {
                block: 9,
                seq: 1,
                reader: 2,
                reader_seq: 0
            }
        )]
    );
    assert_eq!(m.blocks[&9].cachers, [1, 2].into_iter().collect());
}

#[test]
fn a_dirty_owner_writes_back_before_it_forwards() {
    let mut c = client(1);
    let mut out = Vec::new();
    c.start(1, 4, UserOp::Write(7), &mut out).unwrap();
    c.receive(
        S,
        Msg::Data {
            block: 4,
            seq: 0,
            data: 0,
            exclusive: true,
            from_cache: false,
        },
        &mut out,
    )
    .unwrap();
    assert_eq!(c.state(4), BlockState::PrivateDirty);
    out.clear();
    c.receive(
        M,
        Msg::Forward {
            block: 4,
            seq: 1,
            reader: 2,
            reader_seq: 5,
        },
        &mut out,
    )
    .unwrap();
    assert_eq!(
        sends(&mut out),
        vec![(S, Msg::WriteBack { block: 4, data: 7 })]
    );
    c.receive(S, Msg::WriteBackAck { block: 4 }, &mut out)
        .unwrap();
    assert_eq!(
        sends(&mut out),
        vec![(
            2,
            Msg::Data {
                block: 4,
                seq: 5,
                data: 7,
                exclusive: false,
                from_cache: true,
            }
        )]
    );
    assert_eq!(c.state(4), BlockState::ReadShared);
}

#[test]
fn a_revoke_that_overtakes_the_reply_waits_for_it() {
    let mut c = client(1);
    let mut out = Vec::new();
    c.start(1, 4, UserOp::Read, &mut out).unwrap();
    out.clear();
    // The manager's revoke (seq 1) arrives before the peer's data (seq 0).
    c.receive(M, Msg::Revoke { block: 4, seq: 1 }, &mut out)
        .unwrap();
    assert!(out.is_empty());
    assert_eq!(c.counters.revokes_held, 1);
    c.receive(
        2,
        Msg::Data {
            block: 4,
            seq: 0,
            data: 3,
            exclusive: false,
            from_cache: false,
        },
        &mut out,
    )
    .unwrap();
    // The read completes with the data, then the revoke invalidates the kernel.
    assert!(out.contains(&Output::Complete {
        op: 1,
        block: 4,
        outcome: Outcome::Read(3)
    }));
    assert!(out.contains(&Output::InvalidateKernel { block: 4 }));
    out.clear();
    c.kernel_invalidated(4, &mut out).unwrap();
    assert_eq!(sends(&mut out), vec![(M, Msg::RevokeAck { block: 4 })]);
    assert_eq!(c.state(4), BlockState::Invalid);
}

#[test]
fn inputs_without_a_rule_are_errors_not_panics() {
    let mut c = client(1);
    let mut out = Vec::new();
    let e = c
        .receive(M, Msg::Grant { block: 4, seq: 0 }, &mut out)
        .unwrap_err();
    assert!(
        matches!(e, ProtocolError::Unexpected { msg: "Grant", .. }),
        "{e}"
    );
    assert!(c
        .receive(S, Msg::WriteBackAck { block: 4 }, &mut out)
        .is_err());
    assert!(c.kernel_invalidated(4, &mut out).is_err());
    // A replayed sequence number.
    let e = c
        .receive(M, Msg::Revoke { block: 4, seq: 0 }, &mut out)
        .unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::BadSequence {
                seq: 0,
                expected: 1,
                ..
            }
        ),
        "{e}"
    );
    // Messages for another role.
    assert!(c.receive(M, Msg::ReadReq { block: 4 }, &mut out).is_err());
    let mut m = ManagerShard::new(M, ProtocolConfig::default(), placement(), vec![1]);
    assert!(m
        .receive::<u64>(1, Msg::RevokeAck { block: 4 }, &mut out)
        .is_err());
    assert!(m
        .receive::<u64>(1, Msg::Revoke { block: 4, seq: 0 }, &mut out)
        .is_err());
    // An operation on a busy block.
    c.start(2, 6, UserOp::Read, &mut out).unwrap();
    assert_eq!(
        c.start(3, 6, UserOp::Read, &mut out),
        Err(ProtocolError::Busy(6))
    );
}

#[test]
fn sequence_numbers_wrap() {
    let mut c = client(1);
    let mut out = Vec::new();
    c.channels.entry((M, 4)).or_default().next = u32::MAX;
    // Seq 0 comes after u32::MAX: early, held; u32::MAX then releases it.
    c.receive(M, Msg::Revoke { block: 4, seq: 0 }, &mut out)
        .unwrap();
    assert!(out.is_empty());
    c.receive(
        M,
        Msg::Revoke {
            block: 4,
            seq: u32::MAX,
        },
        &mut out,
    )
    .unwrap();
    assert_eq!(sends(&mut out).len(), 2, "both revokes acknowledged");
    assert_eq!(c.channels[&(M, 4)].next, 1);
    // And u32::MAX again is now a duplicate.
    assert!(c
        .receive(
            M,
            Msg::Revoke {
                block: 4,
                seq: u32::MAX
            },
            &mut out
        )
        .is_err());
}

#[test]
fn a_forward_to_a_client_without_a_copy_falls_back_to_storage() {
    let mut c = client(1);
    let mut out = Vec::new();
    let fwd = Msg::Forward {
        block: 4,
        seq: 0,
        reader: 2,
        reader_seq: 7,
    };
    c.receive(M, fwd, &mut out).unwrap();
    let failed = Msg::ForwardFailed {
        block: 4,
        reader: 2,
        reader_seq: 7,
    };
    assert_eq!(sends(&mut out), vec![(M, failed.clone())]);
    let mut m = ManagerShard::new(M, ProtocolConfig::default(), placement(), vec![1, 2]);
    m.receive::<u64>(1, failed, &mut out).unwrap();
    assert_eq!(
        sends(&mut out),
        vec![(
            S,
            Msg::Fetch {
                block: 4,
                to: 2,
                seq: 7,
                exclusive: false
            }
        )]
    );
}

/// A full bounded cache evicts the lowest block not used again since an eviction passed
/// it: a block just read again gets a second chance even when its number is the lowest
/// (the old rule, lowest number first, evicted it); blocks read once go in block order.
#[test]
fn a_full_cache_evicts_a_block_not_used_lately() {
    let mut c = ClientShard::new(1, ProtocolConfig::default(), placement(), 3);
    let mut out = Vec::new();
    let mut op = 0;
    // Read `block` (from storage if it misses); the blocks the read chose to evict.
    let mut read = |c: &mut ClientShard<u64>, block: BlockId| -> Vec<BlockId> {
        op += 1;
        c.start(op, block, UserOp::Read, &mut out).unwrap();
        let evicted = out
            .iter()
            .filter_map(|o| match o {
                Output::InvalidateKernel { block } => Some(*block),
                _ => None,
            })
            .collect();
        let missed = out.iter().any(|o| {
            matches!(
                o,
                Output::Send {
                    msg: Msg::ReadReq { .. },
                    ..
                }
            )
        });
        if missed {
            out.clear();
            let data = Msg::Data {
                block,
                seq: 0,
                data: block,
                exclusive: false,
                from_cache: false,
            };
            c.receive(M, data, &mut out).unwrap();
        }
        let done = out
            .drain(..)
            .any(|o| matches!(o, Output::Complete { outcome: Outcome::Read(d), .. } if d == block));
        assert!(done, "the read of block {block} did not complete");
        evicted
    };
    for b in [1, 2, 3] {
        assert_eq!(read(&mut c, b), Vec::<BlockId>::new(), "block {b}");
    }
    // Full: every block was read once; the lowest goes.
    assert_eq!(read(&mut c, 4), vec![1]);
    // Block 2 is used again: the next miss passes it by and takes block 3.
    assert_eq!(read(&mut c, 2), Vec::<BlockId>::new());
    assert_eq!(read(&mut c, 5), vec![3]);
    // Its second chance is spent: not used since, block 2 goes next.
    assert_eq!(read(&mut c, 6), vec![2]);
    assert_eq!(c.counters.capacity_evictions, 3);
}

/// Two clients with bounded caches, a manager and a store, messages delivered in order
/// until none is left; kernel invalidations answered at once.
struct Bounded {
    clients: BTreeMap<NodeId, ClientShard<u64>>,
    manager: ManagerShard,
    storage: StorageShard<MemStore<u64>>,
    op: OpId,
}

impl Bounded {
    fn new(capacity: usize, hand_off_written: bool) -> Self {
        let config = ProtocolConfig {
            hand_off_written,
            ..ProtocolConfig::default()
        };
        let clients = [1, 2].map(|c| (c, ClientShard::new(c, config, placement(), capacity)));
        Bounded {
            clients: clients.into_iter().collect(),
            manager: ManagerShard::new(M, config, placement(), vec![1, 2]),
            storage: StorageShard {
                store: MemStore::default(),
            },
            op: 0,
        }
    }

    /// No client caches more than `capacity` blocks.
    fn assert_within(&self, capacity: usize) {
        for (c, client) in &self.clients {
            let n = client.cached();
            assert!(n <= capacity, "client {c} holds {n} blocks");
        }
    }

    /// Client `c` runs `user` on `block`; everything it causes is delivered.
    fn run(&mut self, c: NodeId, block: BlockId, user: UserOp<u64>) {
        self.op += 1;
        let mut out = Vec::new();
        let client = self.clients.get_mut(&c).unwrap();
        client.start(self.op, block, user, &mut out).unwrap();
        let mut queue: VecDeque<(NodeId, Output<u64>)> = out.drain(..).map(|o| (c, o)).collect();
        while let Some((at, o)) = queue.pop_front() {
            match o {
                Output::Send { to, msg } => {
                    if to == M {
                        self.manager.receive(at, msg, &mut out).unwrap();
                    } else if to == S {
                        self.storage.receive(at, msg, &mut out).unwrap();
                    } else {
                        let client = self.clients.get_mut(&to).unwrap();
                        client.receive(at, msg, &mut out).unwrap();
                    }
                    queue.extend(out.drain(..).map(|o| (to, o)));
                }
                Output::InvalidateKernel { block } => {
                    let client = self.clients.get_mut(&at).unwrap();
                    client.kernel_invalidated(block, &mut out).unwrap();
                    queue.extend(out.drain(..).map(|o| (at, o)));
                }
                _ => {}
            }
        }
    }
}

#[test]
fn only_a_copy_read_where_it_was_cached_is_handed_off_and_a_handoff_keeps_the_bound() {
    let mut w = Bounded::new(4, false);
    // Client 1 writes 8 blocks and never reads them: each eviction (4 of them) is
    // granted without a handoff, so client 2's cache stays empty.
    for b in 0..8 {
        w.run(1, b, UserOp::Write(b));
    }
    assert_eq!(w.clients[&1].counters.capacity_evictions, 4);
    assert_eq!(
        w.manager.counters.handoffs, 0,
        "copies only written were handed off"
    );
    assert_eq!(w.clients[&2].cached(), 0);
    // Client 1 now reads 12 other blocks: each read copy it evicts is the last one, so it
    // goes to client 2, whose own cache never holds more than its bound.
    for b in 100..112 {
        w.run(1, b, UserOp::Read);
    }
    // Eight read copies evicted by client 1, each handed to client 2 once; client 2 evicts
    // four of them unread, and those are not handed back (not read where they were).
    assert_eq!(w.manager.counters.handoffs, 8, "{:?}", w.manager.counters);
    assert_eq!(w.clients[&2].counters.handoffs_taken, 8);
    assert_eq!(w.clients[&1].counters.handoffs_taken, 0);
    w.assert_within(4);
    // Client 2 made room for the handoffs past its bound by evicting in turn.
    assert!(w.clients[&2].counters.capacity_evictions >= 1);
}

#[test]
fn a_prefetch_is_not_a_use_of_the_block() {
    let mut w = Bounded::new(3, true);
    let has = |w: &Bounded, b: BlockId| {
        w.clients[&1]
            .blocks
            .get(&b)
            .is_some_and(|b| b.data.is_some())
    };
    // Block 0 prefetched twice (the second finds it cached), blocks 1 and 2 read.
    w.run(1, 0, UserOp::Prefetch);
    w.run(1, 0, UserOp::Prefetch);
    w.run(1, 1, UserOp::Read);
    w.run(1, 2, UserOp::Read);
    // The next miss evicts block 0: never read, so not used, and not handed off.
    w.run(1, 3, UserOp::Read);
    assert!(!has(&w, 0), "the prefetched block stayed");
    assert!(has(&w, 1) && has(&w, 2) && has(&w, 3));
    assert_eq!(w.manager.counters.handoffs, 0);
    // A prefetched block's first read is the one that brought it in, not a hit: the next
    // miss passes it by no more than a block read once.
    w.run(1, 4, UserOp::Prefetch);
    w.run(1, 4, UserOp::Read);
    assert!(!w.clients[&1].blocks[&4].referenced);
    w.run(1, 4, UserOp::Read);
    assert!(
        w.clients[&1].blocks[&4].referenced,
        "a second read is a hit"
    );
}

#[test]
fn with_written_copies_offered_too_a_write_stream_hands_each_evicted_copy_on_once() {
    let mut w = Bounded::new(4, true);
    for b in 0..12 {
        w.run(1, b, UserOp::Write(b));
    }
    // Eight written copies evicted by client 1, each handed to client 2 once; client 2
    // drops the four it makes room for (handed, not read there), handing none back.
    assert_eq!(w.clients[&1].counters.capacity_evictions, 8);
    assert_eq!(w.manager.counters.handoffs, 8, "{:?}", w.manager.counters);
    assert_eq!(w.clients[&1].counters.handoffs_taken, 0);
    w.assert_within(4);
}

/// A forward to a holder the cluster removed is served again once, from another copy
/// (not from storage while a copy is cached), and answering it again does nothing.
#[test]
fn a_removed_holders_forward_is_served_again_once_from_another_copy() {
    let mut m = ManagerShard::new(M, ProtocolConfig::default(), placement(), vec![1, 2, 3]);
    let mut out = Vec::new();
    // 1 reads (from storage), then 2 (forwarded to 1), then 3 (forwarded to 2, the last
    // reader).
    for c in [1, 2] {
        m.receive::<u64>(c, Msg::ReadReq { block: 9 }, &mut out)
            .unwrap();
    }
    out.clear();
    m.receive::<u64>(3, Msg::ReadReq { block: 9 }, &mut out)
        .unwrap();
    let fwd = sends(&mut out);
    assert!(
        matches!(
            fwd.as_slice(),
            [(
                2,
                Msg::Forward {
                    block: 9,
                    reader: 3,
                    reader_seq: 0,
                    ..
                }
            )]
        ),
        "{fwd:?}"
    );
    // 2 is removed before it answers: 3 is served by 1, who holds the block (2 may be
    // waiting for its own copy: not a source).
    m.peer_removed::<u64>(2, &mut out).unwrap();
    let again = sends(&mut out);
    assert!(
        matches!(
            again.as_slice(),
            [(
                1,
                Msg::Forward {
                    block: 9,
                    reader: 3,
                    reader_seq: 0,
                    ..
                }
            )]
        ),
        "{again:?}"
    );
    // The forward to 2 bouncing later is not answered a second time.
    let (_, bounced) = fwd[0].clone();
    m.undeliverable::<u64>(2, bounced, &mut out).unwrap();
    assert!(sends(&mut out).is_empty(), "answered twice");
    // Nor is a revoke nobody waits for.
    m.undeliverable::<u64>(2, Msg::Revoke { block: 9, seq: 7 }, &mut out)
        .unwrap();
    assert!(out.is_empty());
}

/// A client gives up a block whose manager went away: the waiting operation is returned
/// for the driver to fail, the copy goes, and the next operation starts afresh.
#[test]
fn a_block_abandoned_returns_its_operation_and_starts_afresh() {
    let mut c = client(1);
    let mut out = Vec::new();
    c.start(5, 9, UserOp::Read, &mut out).unwrap();
    assert!(!c.is_idle(9));
    assert_eq!(c.abandon(9), (Some(5), false));
    assert!(c.is_idle(9));
    assert_eq!(c.abandon_managed_by(M), vec![]);
    out.clear();
    c.start(6, 9, UserOp::Read, &mut out).unwrap();
    assert_eq!(
        sends(&mut out),
        vec![(M, Msg::ReadReq { block: 9 })],
        "a new request"
    );
    assert_eq!(c.abandon_managed_by(M), vec![(9, Some(6), false)]);
}
