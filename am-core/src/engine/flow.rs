//! Flow control and transmission: the advertised window, credits per peer, and turning
//! queued messages into packets in the outbox.

use super::peer::common_header;
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
            if !p.may_send() {
                break;
            }
            let common = common_header(&self.cfg, self.inc, wire::kind::DATA, p.remote_inc);
            let seq = p.next_seq;
            if p.acked == p.next_seq {
                // Nothing was in flight: the unreachable clock starts now.
                p.last_progress = now;
            }
            let mut b = pool_take(&mut self.pool, max_dgram);
            wire::put_data_header(&mut b, &common, seq, p.rx_next, window);
            let Some(m) = p.queue.front_mut() else { break };
            let bulk = m.put_fragment(&mut b, &self.segment, max_dgram, placement);
            let done = m.sent >= m.total();
            p.data_sent(seq, done);
            if !reliable {
                p.keep_unacked(seq, &b, now, &mut self.pool, &self.cfg);
            }
            self.push_packet_with(addr, b, bulk);
        }
        self.send_ack_if_due(addr, window, now);
    }

    /// Sends a standalone acknowledgement (with its selective bitmap) to `addr` if one is
    /// owed and due: at once, or at the delayed-acknowledgement deadline.
    #[inline]
    fn send_ack_if_due(&mut self, addr: SocketAddr, window: u32, now: Time) {
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        if !(p.ack_needed && p.rx_valid && (p.ack_now || now >= p.ack_deadline)) {
            return;
        }
        p.ack_sent();
        let sack = p.sack_bitmap();
        let mut b = pool_take(&mut self.pool, 72);
        wire::encode_packet(
            &mut b,
            &Packet::Ack {
                common: common_header(&self.cfg, self.inc, wire::kind::ACK, p.remote_inc),
                ack: p.rx_next,
                window,
                sack,
            },
        );
        self.push_packet(addr, b);
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

impl Peer {
    /// Whether a DATA packet may go now: the connection is open, a message is queued and
    /// the peer's window has room.
    #[inline]
    fn may_send(&self) -> bool {
        self.state == SendState::Open
            && !self.queue.is_empty()
            && self.in_flight() < self.remote_window as u64
    }

    /// Records that DATA packet `seq` went, carrying the front message's fragment (its last
    /// if `done`, which moves the message to `inflight`).
    #[inline]
    fn data_sent(&mut self, seq: u64, done: bool) {
        self.next_seq += 1;
        if self.rx_buf.is_empty() {
            // The data carries the acknowledgement. With a gap, a standalone ACK with
            // its selective bitmap must still go, so the sender can repair the gap.
            self.ack_sent();
        }
        if done {
            if let Some(mut m) = self.queue.pop_front() {
                m.last_seq = seq;
                if m.hdr.class != Class::Bulk {
                    m.bulk_src = Vec::new();
                }
                self.inflight.push_back(m);
            }
        }
    }

    /// Keeps a copy of DATA packet `seq` (in a buffer from `pool`) until it is
    /// acknowledged, and starts the retransmission timer if it is not running.
    #[inline]
    fn keep_unacked(
        &mut self,
        seq: u64,
        bytes: &[u8],
        now: Time,
        pool: &mut Vec<Vec<u8>>,
        cfg: &Config,
    ) {
        let mut copy = pool_take(pool, bytes.len());
        copy.extend_from_slice(bytes);
        self.unacked.push_back(SentPkt {
            seq,
            bytes: copy,
            sent_at: now,
            retx: 0,
            sacked: false,
        });
        if self.rto_at.is_none() {
            self.rto_at = Some(Time(now.0 + self.rto_ns(cfg)));
        }
    }

    /// An acknowledgement left (standalone, or carried by data): none is owed now.
    #[inline]
    fn ack_sent(&mut self) {
        self.ack_needed = false;
        self.ack_now = false;
        self.rx_since_ack = 0;
    }

    /// The selective-acknowledgement bitmap: bit `d` is set if packet `rx_next + 1 + d`
    /// is in the reorder buffer.
    #[inline]
    fn sack_bitmap(&self) -> [u64; wire::SACK_WORDS] {
        let mut sack = [0u64; wire::SACK_WORDS];
        let base = self.rx_next + 1;
        for (&s, _) in self.rx_buf.range(base..base + MAX_WINDOW as u64) {
            let d = (s - base) as usize;
            sack[d / 64] |= 1u64 << (d % 64);
        }
        sack
    }
}

impl OutMsg {
    /// Appends this message's next fragment to `b`, a DATA packet with its header written:
    /// the message header (first fragment) or the fragment's offset, then as much of the
    /// payload as fits in `max_dgram`. A bulk message that the transport places
    /// (`placement`) is sent whole here without its data; the returned [`BulkWrite`] tells
    /// the transport what to place.
    #[inline]
    fn put_fragment(
        &mut self,
        b: &mut Vec<u8>,
        segment: &[u8],
        max_dgram: usize,
        placement: bool,
    ) -> Option<BulkWrite> {
        if !self.first_sent {
            wire::put_first(
                b,
                &self.hdr,
                &self.args[..self.hdr.nargs as usize],
                self.token.as_ref(),
            );
            self.first_sent = true;
        } else {
            wire::put_cont(b, self.sent as u32);
        }
        let room = max_dgram.saturating_sub(b.len()).max(64);
        let placed = placement && self.hdr.class == Class::Bulk && self.hdr.kind != MsgKind::Bounce;
        let take = if placed {
            0
        } else {
            room.min(self.total() - self.sent)
        };
        let bulk = placed.then(|| BulkWrite {
            tag: self.hdr.dst_tag,
            src: self.bulk_src.clone(),
            dst_offset: self.hdr.bulk_off,
            len: self.total(),
        });
        if placed {
            self.sent = self.total();
        }
        match self.hdr.class {
            Class::Bulk if self.hdr.kind != MsgKind::Bounce => {
                copy_ranges(segment, &self.bulk_src, self.sent, take, b)
            }
            _ => b.extend_from_slice(&self.payload[self.sent..self.sent + take]),
        }
        self.sent += take;
        bulk
    }
}
