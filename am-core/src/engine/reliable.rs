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
        sack: Option<&[u64; wire::SACK_WORDS]>,
    ) {
        let now = self.now;
        let reliable = self.caps.reliable;
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
            p.take_cumulative_ack(ack, now, &self.cfg, &mut self.pool, &mut self.events);
        }
        if let (Some(sack), false) = (sack, reliable) {
            let highest = p.mark_sacked(ack, sack);
            let resend = p.fast_retransmits(highest, now, &self.cfg);
            let addr = p.addr;
            self.retransmit(addr, resend);
        }
    }

    /// Counts and queues retransmitted packets to `addr`.
    #[inline]
    fn retransmit(&mut self, addr: SocketAddr, packets: impl IntoIterator<Item = Vec<u8>>) {
        for b in packets {
            self.stats.retransmits += 1;
            self.stats.bytes_retransmitted += b.len() as u64;
            self.push_packet(addr, b);
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
        self.expire_requests(now);
        let unreachable_ns = self.cfg.unreachable_timeout.as_nanos() as u64;
        let mut cursor = self.peers.keys().next().copied();
        while let Some(addr) = cursor {
            cursor = self.next_peer_after(addr);
            self.peer_timers(addr, now, unreachable_ns);
        }
    }

    /// Ends the requests whose deadline passed by `now` with `Unreachable`.
    fn expire_requests(&mut self, now: Time) {
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
    }

    /// Runs the timers of the connection to `addr`: the handshake's retries, the
    /// retransmission timeout, and giving up on a peer that made no progress for
    /// `unreachable_ns`.
    fn peer_timers(&mut self, addr: SocketAddr, now: Time, unreachable_ns: u64) {
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
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
                    return;
                }
                if now.since_ns(p.last_progress) >= unreachable_ns {
                    self.fail_all(addr, ErrorCode::Unreachable);
                    return;
                }
                if self.caps.reliable {
                    return;
                }
                if p.rto_at.is_some_and(|t| t <= now) {
                    let resend = p.retransmission_timeout(now, &self.cfg);
                    self.retransmit(addr, resend);
                }
            }
            SendState::Idle => {}
        }
    }

    // ------------------------------------------------------------------------------------
    // Walking the peers.

    /// The peer after `addr` in address order (so that `flush` and `handle_timeout` walk
    /// the peers without allocating, while they change them).
    pub(super) fn next_peer_after(&self, addr: SocketAddr) -> Option<SocketAddr> {
        use std::ops::Bound::{Excluded, Unbounded};
        self.peers
            .range((Excluded(addr), Unbounded))
            .next()
            .map(|(a, _)| *a)
    }
}

impl Peer {
    /// Takes an acknowledgement of every packet below `ack` (above what was acknowledged):
    /// frees them (their buffers go back to `pool`), samples the round-trip time, restarts
    /// the timers, and retires the messages now wholly acknowledged (a bulk message's
    /// source ranges may be reused: a `BulkFree` event).
    #[inline]
    fn take_cumulative_ack(
        &mut self,
        ack: u64,
        now: Time,
        cfg: &Config,
        pool: &mut Vec<Vec<u8>>,
        events: &mut VecDeque<Event>,
    ) {
        let mut sample = None;
        while self.unacked.front().is_some_and(|s| s.seq < ack) {
            if let Some(s) = self.unacked.pop_front() {
                if s.retx == 0 {
                    sample = Some(now.since_ns(s.sent_at));
                }
                pool_give(pool, s.bytes);
            }
        }
        if let Some(rtt) = sample {
            self.sample_rtt(rtt);
        }
        self.acked = ack;
        self.backoff = 0;
        self.last_progress = now;
        self.rto_at = (!self.unacked.is_empty()).then(|| Time(now.0 + self.rto_ns(cfg)));
        while self.inflight.front().is_some_and(|m| m.last_seq < ack) {
            if let Some(m) = self.inflight.pop_front() {
                if m.hdr.class == Class::Bulk && m.hdr.kind != MsgKind::Bounce {
                    events.push_back(Event::BulkFree(MsgId(m.id)));
                }
            }
        }
    }

    /// Folds a round-trip sample (of a packet sent once) into the smoothed round-trip time
    /// and its variation.
    #[inline]
    fn sample_rtt(&mut self, rtt: u64) {
        if self.srtt_ns == 0 {
            self.srtt_ns = rtt;
            self.rttvar_ns = rtt / 2;
        } else {
            let err = self.srtt_ns.abs_diff(rtt);
            self.rttvar_ns = (3 * self.rttvar_ns + err) / 4;
            self.srtt_ns = (7 * self.srtt_ns + rtt) / 8;
        }
    }

    /// Marks the unacknowledged packets that `sack` (bit `d`: packet `ack + 1 + d`)
    /// acknowledges selectively; returns the highest of them (0 if none).
    #[inline]
    fn mark_sacked(&mut self, ack: u64, sack: &[u64; wire::SACK_WORDS]) -> u64 {
        let base = ack + 1;
        let mut highest = 0u64;
        for s in self.unacked.iter_mut() {
            let Some(d) = s.seq.checked_sub(base) else {
                continue;
            };
            let d = d as usize;
            if d < MAX_WINDOW as usize && sack[d / 64] & (1u64 << (d % 64)) != 0 {
                s.sacked = true;
                highest = highest.max(s.seq);
            }
        }
        highest
    }

    /// Fast retransmission: a packet three or more below the `highest` selectively
    /// acknowledged one is lost; it is resent once now, later only after a full
    /// retransmission timeout. Returns the packets to resend.
    #[inline]
    fn fast_retransmits(&mut self, highest: u64, now: Time, cfg: &Config) -> Vec<Vec<u8>> {
        let rto = self.rto_ns(cfg);
        let mut resend = Vec::new();
        for s in self.unacked.iter_mut() {
            if s.seq + 3 <= highest && !s.sacked && (s.retx == 0 || now.since_ns(s.sent_at) >= rto)
            {
                s.sent_at = now;
                s.retx += 1;
                resend.push(s.bytes.clone());
            }
        }
        resend
    }

    /// The retransmission timer expired: backs it off and restarts it, and returns the
    /// packet to resend, if any. Only the oldest packet that waited a full timeout is
    /// resent (the timeout may be spurious); holes below selectively acknowledged packets
    /// are resent by fast retransmission in `on_ack`.
    fn retransmission_timeout(&mut self, now: Time, cfg: &Config) -> Option<Vec<u8>> {
        let rto = self.rto_ns(cfg);
        let mut resend = None;
        if let Some(s) = self
            .unacked
            .iter_mut()
            .find(|s| !s.sacked && now.since_ns(s.sent_at) >= rto)
        {
            s.sent_at = now;
            s.retx += 1;
            resend = Some(s.bytes.clone());
        }
        self.backoff += 1;
        self.rto_at = Some(Time(now.0 + self.rto_ns(cfg)));
        resend
    }
}
