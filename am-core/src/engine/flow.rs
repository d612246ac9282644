//! Flow control and transmission: the advertised window, credits per peer, and turning
//! queued messages into packets in the outbox.

use super::*;

impl Core {
    pub(super) fn advertised_window(&self) -> u32 {
        let now = self.now;
        let active = self
            .peers
            .values()
            .filter(|p| p.last_rx.0 != 0 && now.since_ns(p.last_rx) < ACTIVE_NS)
            .count()
            .max(1) as u32;
        // The budget is in packets and in bytes (the socket buffer holds bytes): with a
        // large MTU the byte budget is the tighter one.
        let by_bytes = self.cfg.recv_budget_bytes / self.caps.max_datagram.max(1);
        let budget = (self.cfg.recv_budget_packets as usize).min(by_bytes) as u32;
        (budget / active).clamp(4, self.cfg.recv_window_packets)
    }

    /// Packetises queued messages within each peer's window, opens connections that have
    /// queued messages, and writes acknowledgements. Call after a batch of inputs.
    pub fn flush(&mut self) {
        // Nothing was queued, received or timed out since the last flush: nothing to do
        // (this runs on every poll, busy-polling included).
        if !self.flush_needed {
            return;
        }
        self.flush_needed = false;
        let window = self.advertised_window();
        self.last_window = window;
        // Walk the peers without allocating (flush runs on every poll).
        let mut cursor = self.peers.keys().next().copied();
        while let Some(addr) = cursor {
            self.flush_peer(addr, window);
            cursor = self.next_peer_after(addr);
        }
    }

    pub(super) fn flush_peer(&mut self, addr: SocketAddr, window: u32) {
        let now = self.now;
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        if p.state == SendState::Idle && !p.queue.is_empty() {
            p.state = SendState::Connecting {
                since: now,
                last_hello: now,
            };
            let (inc, next) = (p.remote_inc, p.next_seq);
            self.send_hello(addr, wire::kind::HELLO, inc, next);
        }
        let max_dgram = self.caps.max_datagram;
        let reliable = self.caps.reliable;
        let placement = self.caps.bulk_placement;
        loop {
            let Some(p) = self.peers.get_mut(&addr) else {
                return;
            };
            if p.state != SendState::Open
                || p.queue.is_empty()
                || p.in_flight() >= p.remote_window as u64
            {
                break;
            }
            let common = Common {
                version: self.cfg.protocol_version,
                kind: wire::kind::DATA,
                vnet: self.cfg.vnet,
                src_inc: self.inc,
                dst_inc: p.remote_inc,
            };
            let seq = p.next_seq;
            if p.acked == p.next_seq {
                // Nothing was in flight: the unreachable clock starts now.
                p.last_progress = now;
            }
            let mut b = pool_take(&mut self.pool, max_dgram);
            wire::put_data_header(&mut b, &common, seq, p.rx_next, window);
            let Some(m) = p.queue.front_mut() else { break };
            let room;
            if !m.first_sent {
                wire::put_first(
                    &mut b,
                    &m.hdr,
                    &m.args[..m.hdr.nargs as usize],
                    m.token.as_ref(),
                );
                m.first_sent = true;
                room = max_dgram.saturating_sub(b.len()).max(64);
            } else {
                wire::put_cont(&mut b, m.sent as u32);
                room = max_dgram.saturating_sub(b.len()).max(64);
            }
            let placed = placement && m.hdr.class == Class::Bulk && m.hdr.kind != MsgKind::Bounce;
            let take = if placed {
                0
            } else {
                room.min(m.total() - m.sent)
            };
            let bulk = placed.then(|| BulkWrite {
                tag: m.hdr.dst_tag,
                src: m.bulk_src.clone(),
                dst_offset: m.hdr.bulk_off,
                len: m.total(),
            });
            if placed {
                m.sent = m.total();
            }
            match m.hdr.class {
                Class::Bulk if m.hdr.kind != MsgKind::Bounce => {
                    copy_ranges(&self.segment, &m.bulk_src, m.sent, take, &mut b)
                }
                _ => b.extend_from_slice(&m.payload[m.sent..m.sent + take]),
            }
            m.sent += take;
            let done = m.sent >= m.total();
            p.next_seq += 1;
            if p.rx_buf.is_empty() {
                // The data carries the acknowledgement. With a gap, a standalone ACK with
                // its selective bitmap must still go, so the sender can repair the gap.
                p.ack_needed = false;
                p.ack_now = false;
                p.rx_since_ack = 0;
            }
            if done {
                if let Some(mut m) = p.queue.pop_front() {
                    m.last_seq = seq;
                    if m.hdr.class != Class::Bulk {
                        m.bulk_src = Vec::new();
                    }
                    p.inflight.push_back(m);
                }
            }
            if !reliable {
                p.unacked.push_back(SentPkt {
                    seq,
                    bytes: {
                        let mut copy = pool_take(&mut self.pool, b.len());
                        copy.extend_from_slice(&b);
                        copy
                    },
                    sent_at: now,
                    retx: 0,
                    sacked: false,
                });
                if p.rto_at.is_none() {
                    p.rto_at = Some(Time(now.0 + p.rto_ns(&self.cfg)));
                }
            }
            self.push_packet_with(addr, b, bulk);
        }
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        if p.ack_needed && p.rx_valid && (p.ack_now || now >= p.ack_deadline) {
            p.ack_needed = false;
            p.ack_now = false;
            p.rx_since_ack = 0;
            let mut sack = [0u64; wire::SACK_WORDS];
            let base = p.rx_next + 1;
            for (&s, _) in p.rx_buf.range(base..base + MAX_WINDOW as u64) {
                let d = (s - base) as usize;
                sack[d / 64] |= 1u64 << (d % 64);
            }
            let mut b = pool_take(&mut self.pool, 72);
            wire::encode_packet(
                &mut b,
                &Packet::Ack {
                    common: Common {
                        version: self.cfg.protocol_version,
                        kind: wire::kind::ACK,
                        vnet: self.cfg.vnet,
                        src_inc: self.inc,
                        dst_inc: p.remote_inc,
                    },
                    ack: p.rx_next,
                    window,
                    sack,
                },
            );
            self.push_packet(addr, b);
        }
    }

    /// Drops the first `n` datagrams of the outbox (the transport took them) and keeps
    /// their buffers for reuse.
    pub fn sent(&mut self, n: usize) {
        let n = n.min(self.outbox.len());
        for t in self.outbox.drain(..n) {
            pool_give(&mut self.pool, t.bytes);
        }
    }

    /// Datagrams waiting for the transport, oldest first.
    pub fn outbox(&mut self) -> &mut VecDeque<Transmit> {
        &mut self.outbox
    }
}
