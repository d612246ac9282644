//! The data path: SENDs from pre-posted registered buffers within the receiver's credits,
//! bulk as RDMA WRITEs ending in a WRITE with immediate, control messages, completions
//! processed and reported as progress, stalled peers probed, and the completion-channel
//! wait.

use super::*;

impl RdmaTransport {
    /// Posts one SEND of `[prefix | body]`; false if the send queue is full.
    pub(super) fn post_send(&mut self, addr: SocketAddr, pfx: u8, body: &[u8]) -> io::Result<bool> {
        let max_inline = self.cfg.max_inline as usize;
        let depth = self.cfg.send_depth;
        let slot = self.slot;
        let Some(p) = self.peers.get_mut(&addr) else {
            return Ok(false);
        };
        if p.outstanding >= depth {
            return Ok(false);
        }
        let idx = (p.posted % depth as u64) as usize;
        let wr_id = ((p.id as u64) << 32) | SEND_BIT | idx as u64;
        if body.len() < max_inline {
            p.qp.post_send_inline(wr_id, &[&[pfx], body])?;
            self.stats.sends_inline += 1;
        } else {
            if body.len() + 1 > slot {
                return Err(io::Error::other("datagram larger than a receive slot"));
            }
            let off = idx * slot;
            let b = &mut p.ring.bytes_mut()[off..off + body.len() + 1];
            b[0] = pfx;
            b[1..].copy_from_slice(body);
            p.qp.post_send(wr_id, &p.ring, off, body.len() + 1)?;
        }
        if p.outstanding == 0 {
            p.stalled_since = Some(coarse_now_ns());
        }
        p.outstanding += 1;
        p.posted += 1;
        self.stats.sends_posted += 1;
        Ok(true)
    }

    /// Sends what waits for `addr`, in order, as far as connection, keys and send credits
    /// allow.
    pub(super) fn flush_peer(&mut self, addr: SocketAddr) -> io::Result<()> {
        loop {
            // Key requests and answers go first: a bulk may be waiting for one.
            self.flush_control(addr)?;
            let Some(p) = self.peers.get_mut(&addr) else {
                return Ok(());
            };
            if p.remote.is_none() || !p.control.is_empty() {
                return Ok(());
            }
            if p.writing.is_some() {
                self.post_writes(addr)?;
                if self.peers.get(&addr).is_some_and(|p| p.writing.is_some()) {
                    return Ok(());
                }
                continue;
            }
            let Some(p) = self.peers.get_mut(&addr) else {
                return Ok(());
            };
            let Some(t) = p.pending.pop_front() else {
                return Ok(());
            };
            match self.try_send(addr, &t)? {
                true => {}
                false => {
                    if let Some(p) = self.peers.get_mut(&addr) {
                        p.pending.push_front(t);
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Sends one datagram on an open connection; false: not now (credits, key pending).
    pub(super) fn try_send(&mut self, addr: SocketAddr, t: &Transmit) -> io::Result<bool> {
        let Some(b) = t.bulk.as_ref().filter(|b| b.len > 0) else {
            return self.post_send(addr, prefix::DATA, &t.bytes);
        };
        let depth = self.cfg.send_depth;
        let Some(p) = self.peers.get_mut(&addr) else {
            return Ok(false);
        };
        match p.grants.get(&b.tag).copied() {
            None => {
                p.grants.insert(b.tag, Grant::Asked);
                let mut c = vec![prefix::ASK];
                c.extend_from_slice(&b.tag.to_le_bytes());
                p.control.push_back(c);
                let _ = self.flush_control(addr);
                Ok(false)
            }
            Some(Grant::Asked) => Ok(false),
            Some(Grant::Refused) => {
                self.stats.bulk_header_only += 1;
                self.post_send(addr, prefix::DATA, &t.bytes)
            }
            Some(Grant::Have {
                rkey,
                addr: base,
                len,
            }) => {
                let fits = b
                    .dst_offset
                    .checked_add(b.len as u64)
                    .is_some_and(|end| end <= len);
                if !fits {
                    self.stats.bulk_header_only += 1;
                    return self.post_send(addr, prefix::DATA, &t.bytes);
                }
                if p.outstanding + 2 > depth {
                    return Ok(false);
                }
                if !self.post_send(addr, prefix::BULK, &t.bytes)? {
                    return Ok(false);
                }
                // (post_writes fails at once if no segment was registered.)
                if let Some(p) = self.peers.get_mut(&addr) {
                    p.writing = Some(BulkCursor::new(&b.src, rkey, base + b.dst_offset));
                }
                self.post_writes(addr)?;
                Ok(true)
            }
        }
    }

    /// Posts the WRITEs of the bulk in progress towards `addr` while send slots allow;
    /// the last carries the immediate that releases the receiver's parked header.
    pub(super) fn post_writes(&mut self, addr: SocketAddr) -> io::Result<()> {
        let depth = self.cfg.send_depth;
        let Some(seg) = self.segment.as_ref() else {
            return Err(io::Error::other("bulk before the segment was registered"));
        };
        let Some(p) = self.peers.get_mut(&addr) else {
            return Ok(());
        };
        while p.outstanding < depth && p.writes_in_flight < WRITE_WINDOW {
            let Some(cur) = p.writing.as_mut() else {
                break;
            };
            let (src, raddr, last) = cur.next_chunk(WRITE_CHUNK_BYTES);
            let rkey = cur.rkey;
            let idx = (p.posted % depth as u64) as usize;
            let wr_id = ((p.id as u64) << 32) | SEND_BIT | WRITE_BIT | idx as u64;
            let imm = last.then_some(p.imm_send);
            p.qp.post_write(wr_id, seg, &src, rkey, raddr, imm)?;
            if p.outstanding == 0 {
                p.stalled_since = Some(coarse_now_ns());
            }
            p.outstanding += 1;
            p.writes_in_flight += 1;
            p.posted += 1;
            self.stats.bytes_written += src.iter().map(|r| r.1 as u64).sum::<u64>();
            if last {
                p.imm_send = p.imm_send.wrapping_add(1);
                p.writing = None;
                self.stats.writes_imm_posted += 1;
            } else {
                self.stats.writes_posted += 1;
            }
        }
        Ok(())
    }

    pub(super) fn flush_control(&mut self, addr: SocketAddr) -> io::Result<()> {
        loop {
            let Some(p) = self.peers.get_mut(&addr) else {
                return Ok(());
            };
            if p.remote.is_none() {
                return Ok(());
            }
            let Some(c) = p.control.pop_front() else {
                return Ok(());
            };
            if !self.post_send(addr, c[0], &c[1..])? {
                if let Some(p) = self.peers.get_mut(&addr) {
                    p.control.push_front(c);
                }
                return Ok(());
            }
        }
    }

    pub(super) fn on_control(&mut self, addr: SocketAddr, body: &[u8], pfx: u8) {
        match pfx {
            prefix::ASK if body.len() == 8 => {
                let tag = u64::from_le_bytes(body.try_into().unwrap_or([0; 8]));
                let mut c = vec![prefix::GRANT];
                match (&self.segment, tag == self.tag) {
                    (Some(seg), true) => {
                        let (rkey, base, len) = seg.grant();
                        c.push(1);
                        c.extend_from_slice(&tag.to_le_bytes());
                        c.extend_from_slice(&rkey.to_le_bytes());
                        c.extend_from_slice(&base.to_le_bytes());
                        c.extend_from_slice(&len.to_le_bytes());
                        self.stats.grants += 1;
                    }
                    _ => {
                        c.push(0);
                        c.extend_from_slice(&tag.to_le_bytes());
                        c.extend_from_slice(&[0; 20]);
                        self.stats.refusals += 1;
                    }
                }
                if let Some(p) = self.peers.get_mut(&addr) {
                    p.control.push_back(c);
                }
                let _ = self.flush_control(addr);
            }
            prefix::GRANT if body.len() == 29 => {
                let tag = u64::from_le_bytes(body[1..9].try_into().unwrap_or([0; 8]));
                let g = if body[0] == 1 {
                    Grant::Have {
                        rkey: u32::from_le_bytes(body[9..13].try_into().unwrap_or([0; 4])),
                        addr: u64::from_le_bytes(body[13..21].try_into().unwrap_or([0; 8])),
                        len: u64::from_le_bytes(body[21..29].try_into().unwrap_or([0; 8])),
                    }
                } else {
                    Grant::Refused
                };
                if let Some(p) = self.peers.get_mut(&addr) {
                    p.grants.insert(tag, g);
                }
                let _ = self.flush_peer(addr);
            }
            _ => self.stats.malformed += 1,
        }
    }

    /// Handles completions in `self.wcs`, delivering datagrams; returns how many delivered.
    pub(super) fn process_wcs(&mut self, deliver: &mut dyn FnMut(SocketAddr, &[u8])) -> usize {
        let mut delivered = 0;
        let wcs = std::mem::take(&mut self.wcs);
        let mut flush = Vec::new();
        for wc in &wcs {
            let id = (wc.wr_id >> 32) as u32;
            let Some(&addr) = self.by_id.get(&id) else {
                continue; // a completion of a torn-down queue pair
            };
            if wc.wr_id & SEND_BIT != 0 {
                self.on_send_completion(wc, addr, &mut flush);
                continue;
            }
            if wc.status != 0 {
                self.stats.error_completions += 1;
                self.fail_peer(addr);
                continue;
            }
            let slot_idx = (wc.wr_id & 0xffff_ffff) as usize;
            if wc.opcode == verbs::opcode::RECV_RDMA_WITH_IMM {
                match self.on_write_with_imm(wc, addr) {
                    Some(h) => {
                        deliver(addr, &h);
                        delivered += 1;
                    }
                    None => continue, // the connection was torn down
                }
            } else {
                delivered += self.on_recv(addr, slot_idx, wc.byte_len as usize, deliver);
            }
            self.repost_recv(addr, slot_idx);
        }
        self.wcs = wcs;
        self.wcs.clear();
        for addr in flush {
            if self.flush_peer(addr).is_err() {
                self.fail_peer(addr);
            }
        }
        delivered
    }

    /// A SEND or WRITE of ours completed: its ring slot is free; a peer with datagrams or
    /// WRITEs waiting for one goes into `flush`. An error completion fails the peer.
    fn on_send_completion(
        &mut self,
        wc: &verbs::Wc,
        addr: SocketAddr,
        flush: &mut Vec<SocketAddr>,
    ) {
        if let Some(p) = self.peers.get_mut(&addr) {
            p.outstanding = p.outstanding.saturating_sub(1);
            if wc.wr_id & WRITE_BIT != 0 {
                p.writes_in_flight = p.writes_in_flight.saturating_sub(1);
            }
            p.stalled_since = (p.outstanding > 0).then(coarse_now_ns);
            if wc.status == 0 {
                if !std::mem::replace(&mut p.progressed, true) {
                    self.progressed.push(addr);
                }
                self.stats.sends_completed += 1;
            }
            let waiting = !(p.pending.is_empty() && p.control.is_empty() && p.writing.is_none());
            if waiting && !flush.contains(&addr) {
                flush.push(addr);
            }
        }
        if wc.status != 0 {
            self.stats.error_completions += 1;
            self.fail_peer(addr);
        }
    }

    /// A WRITE with immediate landed: returns the bulk header parked for it, or `None`
    /// (the connection torn down) when there is none or it is out of step.
    fn on_write_with_imm(&mut self, wc: &verbs::Wc, addr: SocketAddr) -> Option<Vec<u8>> {
        self.stats.writes_imm_received += 1;
        let hdr = self.peers.get_mut(&addr).and_then(|p| {
            let expect = p.imm_recv;
            p.imm_recv = p.imm_recv.wrapping_add(1);
            p.parked.pop_front().filter(|_| wc.imm == expect)
        });
        if hdr.is_none() {
            // A WRITE with immediate without its header, or out of step: the peer broke
            // the protocol, and a datagram is lost. Tear the connection down so the engine
            // returns what it had sent and re-opens, rather than stall on the gap.
            self.stats.malformed += 1;
            self.fail_peer(addr);
        }
        hdr
    }

    /// A SEND of `len` bytes arrived in receive slot `slot_idx`: a datagram is delivered
    /// straight from the slot (returns 1), a bulk header parked for its WRITE, a control
    /// message handled.
    fn on_recv(
        &mut self,
        addr: SocketAddr,
        slot_idx: usize,
        len: usize,
        deliver: &mut dyn FnMut(SocketAddr, &[u8]),
    ) -> usize {
        self.stats.recvs += 1;
        let slot = self.slot;
        let mut delivered = 0;
        let mut control = None;
        match self.peers.get_mut(&addr) {
            Some(p) if len >= 1 && len <= slot => {
                let b = &p.recv.bytes()[slot_idx * slot..slot_idx * slot + len];
                match b[0] {
                    prefix::DATA => {
                        // Straight from the receive slot: it is reposted after the engine
                        // has taken the datagram.
                        deliver(addr, &b[1..]);
                        delivered = 1;
                    }
                    prefix::BULK => {
                        let h = b[1..].to_vec();
                        p.parked.push_back(h);
                    }
                    other => control = Some((other, b[1..].to_vec())),
                }
            }
            _ => self.stats.malformed += 1,
        }
        if let Some((pfx, body)) = control {
            self.on_control(addr, &body, pfx);
        }
        delivered
    }

    /// Gives receive slot `slot_idx` back to the peer's queue pair.
    fn repost_recv(&mut self, addr: SocketAddr, slot_idx: usize) {
        let slot = self.slot;
        if let Some(p) = self.peers.get_mut(&addr) {
            let wr_id = ((p.id as u64) << 32) | slot_idx as u64;
            if p.qp.post_recv(wr_id, &p.recv, slot_idx, slot).is_err() {
                self.fail_peer(addr);
            }
        }
    }

    pub(super) fn probe_stalled(&mut self) {
        // Runs on every batch: look at the peers at most every PROBE_CHECK, not per poll.
        let now = coarse_now_ns();
        if now.saturating_sub(self.last_probe_check) < PROBE_CHECK.as_nanos() as u64 {
            return;
        }
        self.last_probe_check = now;
        if !self.stalled_any() {
            return;
        }
        let (req_every, probe_after) = (REQ_EVERY.as_nanos() as u64, PROBE_AFTER.as_nanos() as u64);
        let mut due = Vec::new();
        for (&addr, p) in &mut self.peers {
            if p.remote.is_none() {
                if !p.pending.is_empty() && now.saturating_sub(p.last_req) >= req_every {
                    p.last_req = now;
                    due.push((addr, oob::REQ, 0));
                }
                continue;
            }
            if p.stalled_since
                .is_some_and(|t| now.saturating_sub(t) >= probe_after)
                && now.saturating_sub(p.last_probe) >= probe_after
            {
                p.last_probe = now;
                let echo = p.remote.map_or(0, |r| r.1);
                due.push((addr, oob::PROBE, echo));
            }
        }
        for (addr, kind, echo) in due {
            self.oob(addr, kind, echo);
        }
    }

    /// Polls the CQ into the stash that the next `recv_batch` processes.
    pub(super) fn poll_cq_stash(&mut self) -> Result<usize, TransportError> {
        let mut wcs = std::mem::take(&mut self.wcs);
        let n = self.dev.poll(&mut wcs, 64);
        self.wcs = wcs;
        n.map_err(|e| io("poll the completion queue", e))
    }

    pub(super) fn note_events(&mut self, evs: &EpollEvents) {
        for t in evs.tokens() {
            match t {
                TOKEN_EVENTFD => {
                    self.eventfd.0.drain();
                }
                TOKEN_CQ => self.dev.drain_events(),
                TOKEN_UDP => self.udp_ready = true,
                _ => {}
            }
        }
    }

    /// Busy-polling wait: spins on the CQ (no system call); looks at the other fds every
    /// 256 turns.
    pub(super) fn spin(
        &mut self,
        timeout: Option<Duration>,
        mask: EventMask,
    ) -> Result<(), TransportError> {
        let deadline = timeout.map(|t| coarse_now_ns() + t.as_nanos() as u64);
        let mut turn = 0u32;
        loop {
            if mask.network && self.poll_cq_stash()? > 0 {
                return Ok(());
            }
            turn = turn.wrapping_add(1);
            if turn.is_multiple_of(256) {
                let mut evs = EpollEvents::default();
                self.epoll
                    .wait(&mut evs, 0)
                    .map_err(|e| io("epoll_wait", e))?;
                self.note_events(&evs);
                let woken = evs.tokens().any(|t| match t {
                    TOKEN_EVENTFD => mask.handle,
                    _ => mask.network,
                });
                if woken {
                    return Ok(());
                }
                if deadline.is_some_and(|d| coarse_now_ns() >= d) {
                    return Ok(());
                }
            }
            std::hint::spin_loop();
        }
    }

    pub(super) fn stalled_any(&self) -> bool {
        self.peers
            .values()
            .any(|p| p.stalled_since.is_some() || (p.remote.is_none() && !p.pending.is_empty()))
    }
}
