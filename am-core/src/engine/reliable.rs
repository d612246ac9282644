//! Reliability over datagrams: acknowledgements (cumulative and selective), retransmission
//! timers, giving up on a peer (`Unreachable`), and the error upcalls that return
//! undeliverable messages in order.

use super::*;

impl Core {
    /// Routes an undeliverable message: to its request's gather, or to the upcall.
    pub(super) fn upcall(&mut self, u: Undeliverable) {
        self.stats.upcalls += 1;
        if let Some(RequestId(rid)) = u.request {
            if let Some(req) = self.requests.remove(&rid) {
                self.deadlines.remove(&(req.deadline, rid));
                if let Some((gid, slot)) = req.gather {
                    self.gather_fill(gid, slot, Err(u.code));
                    return;
                }
            }
        }
        self.events.push_back(Event::Upcall(u));
    }

    pub(super) fn undeliverable_of(
        &self,
        dest: SocketAddr,
        m: &OutMsg,
        code: ErrorCode,
    ) -> Undeliverable {
        let vnet = self.cfg.vnet;
        Undeliverable {
            code,
            dest: EndpointName { addr: dest, vnet },
            msg_id: MsgId(m.id),
            kind: m.hdr.kind,
            handler: m.hdr.handler,
            args: m.args[..m.hdr.nargs as usize].to_vec(),
            payload: m.payload.clone(),
            bulk: (m.hdr.class == Class::Bulk).then_some((m.hdr.bulk_off, m.total())),
            request: (m.hdr.kind == MsgKind::Request && m.token.is_none())
                .then_some(RequestId(m.hdr.req_id)),
            delegated_for: m.token.map(|t| EndpointName { addr: t.addr, vnet }),
        }
    }

    /// Returns every message sent (fully or partly) on the connection and not acknowledged;
    /// the send direction must then re-open with a HELLO.
    pub(super) fn fail_sent(&mut self, addr: SocketAddr, code: ErrorCode) {
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        let mut failed: Vec<OutMsg> = p.inflight.drain(..).collect();
        if p.queue.front().is_some_and(|m| m.first_sent) {
            if let Some(m) = p.queue.pop_front() {
                failed.push(m);
            }
        }
        p.unacked.clear();
        p.acked = p.next_seq;
        p.state = SendState::Idle;
        p.backoff = 0;
        p.rto_at = None;
        self.stats.connection_failures += 1;
        for m in failed {
            let u = self.undeliverable_of(addr, &m, code);
            self.upcall(u);
        }
    }

    /// Returns everything pending towards `addr`, queued or sent.
    pub(super) fn fail_all(&mut self, addr: SocketAddr, code: ErrorCode) {
        self.fail_sent(addr, code);
        let queued: Vec<OutMsg> = match self.peers.get_mut(&addr) {
            Some(p) => p.queue.drain(..).collect(),
            None => return,
        };
        for m in queued {
            let u = self.undeliverable_of(addr, &m, code);
            self.upcall(u);
        }
    }

    pub(super) fn on_ack(
        &mut self,
        from: SocketAddr,
        ack: u64,
        window: u32,
        sack: Option<&[u64; 4]>,
    ) {
        let now = self.now;
        let reliable = self.caps.reliable;
        let mut freed = Vec::new();
        {
            let Some(p) = self.peers.get_mut(&from) else {
                return;
            };
            if p.state != SendState::Open {
                return;
            }
            if ack > p.next_seq {
                self.stats.malformed_dropped += 1;
                return;
            }
            p.remote_window = window.clamp(1, MAX_WINDOW);
            if ack > p.acked {
                let mut sample = None;
                while p.unacked.front().is_some_and(|s| s.seq < ack) {
                    if let Some(s) = p.unacked.pop_front() {
                        if s.retx == 0 {
                            sample = Some(now.since_ns(s.sent_at));
                        }
                        pool_give(&mut self.pool, s.bytes);
                    }
                }
                if let Some(rtt) = sample {
                    if p.srtt_ns == 0 {
                        p.srtt_ns = rtt;
                        p.rttvar_ns = rtt / 2;
                    } else {
                        let err = p.srtt_ns.abs_diff(rtt);
                        p.rttvar_ns = (3 * p.rttvar_ns + err) / 4;
                        p.srtt_ns = (7 * p.srtt_ns + rtt) / 8;
                    }
                }
                p.acked = ack;
                p.backoff = 0;
                p.last_progress = now;
                p.rto_at = (!p.unacked.is_empty()).then(|| Time(now.0 + p.rto_ns(&self.cfg)));
                while p.inflight.front().is_some_and(|m| m.last_seq < ack) {
                    if let Some(m) = p.inflight.pop_front() {
                        if m.hdr.class == Class::Bulk && m.hdr.kind != MsgKind::Bounce {
                            freed.push(MsgId(m.id));
                        }
                    }
                }
            }
            if let (Some(sack), false) = (sack, reliable) {
                let base = ack + 1;
                let mut highest = 0u64;
                for s in p.unacked.iter_mut() {
                    let Some(d) = s.seq.checked_sub(base) else {
                        continue;
                    };
                    let d = d as usize;
                    if d < 256 && sack[d / 64] & (1u64 << (d % 64)) != 0 {
                        s.sacked = true;
                        highest = highest.max(s.seq);
                    }
                }
                // Fast retransmission: a packet three or more below a selectively
                // acknowledged one is lost; resend it once now, later only after a full
                // retransmission timeout.
                let rto = p.rto_ns(&self.cfg);
                let mut resend = Vec::new();
                for s in p.unacked.iter_mut() {
                    if s.seq + 3 <= highest
                        && !s.sacked
                        && (s.retx == 0 || now.since_ns(s.sent_at) >= rto)
                    {
                        s.sent_at = now;
                        s.retx += 1;
                        resend.push(s.bytes.clone());
                    }
                }
                let addr = p.addr;
                for b in resend {
                    self.stats.retransmits += 1;
                    self.stats.bytes_retransmitted += b.len() as u64;
                    self.push_packet(addr, b);
                }
            }
        }
        for id in freed {
            self.events.push_back(Event::BulkFree(id));
        }
    }

    // ------------------------------------------------------------------------------------
    // Time.

    /// When [`Core::handle_timeout`] must next run, if ever.
    pub fn poll_timeout(&self) -> Option<Time> {
        let mut t = self.deadlines.iter().next().map(|(t, _)| *t);
        let mut min = |x: Time| t = Some(t.map_or(x, |y| y.min(x)));
        let rto_base = |p: &Peer| Time(p.rto_ns(&self.cfg));
        for p in self.peers.values() {
            if p.ack_needed {
                min(if p.ack_now { self.now } else { p.ack_deadline });
            }
            match p.state {
                SendState::Connecting { since, last_hello } => {
                    min(Time(last_hello.0 + rto_base(p).0));
                    min(since.plus(self.cfg.unreachable_timeout));
                }
                SendState::Open if !p.unacked.is_empty() || !p.inflight.is_empty() => {
                    if let Some(at) = p.rto_at {
                        min(at);
                    }
                    min(p.last_progress.plus(self.cfg.unreachable_timeout));
                }
                _ => {}
            }
        }
        t
    }

    /// Runs timers due at `now`: retransmissions, handshake retries, unreachable peers,
    /// request deadlines.
    pub fn handle_timeout(&mut self, now: Time) {
        self.flush_needed = true;
        self.set_now(now);
        let now = self.now;
        // Request deadlines.
        while let Some(&(t, rid)) = self.deadlines.iter().next() {
            if t > now {
                break;
            }
            self.deadlines.remove(&(t, rid));
            if let Some(req) = self.requests.get(&rid) {
                let u = Undeliverable {
                    code: ErrorCode::Unreachable,
                    dest: req.dest,
                    msg_id: MsgId(req.msg_id),
                    kind: MsgKind::Request,
                    handler: req.handler,
                    args: req.args.clone(),
                    payload: Vec::new(),
                    bulk: None,
                    request: Some(RequestId(rid)),
                    delegated_for: None,
                };
                self.upcall(u);
            }
        }
        let unreachable_ns = self.cfg.unreachable_timeout.as_nanos() as u64;
        let mut cursor = self.peers.keys().next().copied();
        while let Some(addr) = cursor {
            cursor = self.next_peer_after(addr);
            let Some(p) = self.peers.get_mut(&addr) else {
                continue;
            };
            match p.state {
                SendState::Connecting { since, last_hello } => {
                    if now.since_ns(since) >= unreachable_ns {
                        self.fail_all(addr, ErrorCode::Unreachable);
                    } else if now.since_ns(last_hello) >= p.rto_ns(&self.cfg) {
                        p.state = SendState::Connecting {
                            since,
                            last_hello: now,
                        };
                        p.backoff += 1;
                        let (inc, next) = (p.remote_inc, p.next_seq);
                        self.send_hello(addr, wire::kind::HELLO, inc, next);
                    }
                }
                SendState::Open => {
                    if p.unacked.is_empty() && p.inflight.is_empty() {
                        continue;
                    }
                    if now.since_ns(p.last_progress) >= unreachable_ns {
                        self.fail_all(addr, ErrorCode::Unreachable);
                        continue;
                    }
                    if self.caps.reliable {
                        continue;
                    }
                    if p.rto_at.is_some_and(|t| t <= now) {
                        // Resend only the oldest packet that waited a full timeout (the
                        // timeout may be spurious); holes below selectively acknowledged
                        // packets are resent by fast retransmission in `on_ack`.
                        let rto = p.rto_ns(&self.cfg);
                        let mut resend = Vec::new();
                        if let Some(s) = p
                            .unacked
                            .iter_mut()
                            .find(|s| !s.sacked && now.since_ns(s.sent_at) >= rto)
                        {
                            s.sent_at = now;
                            s.retx += 1;
                            resend.push(s.bytes.clone());
                        }
                        p.backoff += 1;
                        p.rto_at = Some(Time(now.0 + p.rto_ns(&self.cfg)));
                        for b in resend {
                            self.stats.retransmits += 1;
                            self.stats.bytes_retransmitted += b.len() as u64;
                            self.push_packet(addr, b);
                        }
                    }
                }
                SendState::Idle => {}
            }
        }
    }

    // ------------------------------------------------------------------------------------
    // Output.

    pub(super) fn next_peer_after(&self, addr: SocketAddr) -> Option<SocketAddr> {
        use std::ops::Bound::{Excluded, Unbounded};
        self.peers
            .range((Excluded(addr), Unbounded))
            .next()
            .map(|(a, _)| *a)
    }
}
