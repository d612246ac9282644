//! The receive path: datagrams parsed, frames checked (tags, handlers, duplicates),
//! fragments reassembled, messages completed and delivered (inline when whole and in order)
//! or bounced back to their sender.

use super::*;

impl Core {
    /// As [`Core::handle_datagram`], but a medium message that arrives whole and in order
    /// is not copied: its delivery names its payload's place in `bytes`, and
    /// [`Core::take_inline_queued`] says so. The caller must then run every queued event
    /// before `bytes` goes away (the endpoint does, inside the transport's receive call, so
    /// a handler reads the transport's buffer: an mbuf, a registered receive buffer).
    pub(crate) fn handle_datagram_inline(&mut self, from: SocketAddr, bytes: &[u8]) {
        self.inline_datagram = Some((bytes.as_ptr() as usize, bytes.len()));
        self.handle_datagram(from, bytes);
        self.inline_datagram = None;
    }

    /// Whether an inline delivery was queued since the last call (and clears it).
    pub(crate) fn take_inline_queued(&mut self) -> bool {
        std::mem::take(&mut self.inline_queued)
    }

    /// Handles one received datagram. Bad input is counted and dropped.
    pub fn handle_datagram(&mut self, from: SocketAddr, bytes: &[u8]) {
        self.flush_needed = true;
        self.stats.packets_received += 1;
        // Another version is answered from the fixed common header alone: the rest of its
        // packets may be laid out differently.
        let common = match wire::parse_common(bytes) {
            Ok(c) => c,
            Err(_) => {
                self.stats.malformed_dropped += 1;
                return;
            }
        };
        if common.version != self.cfg.protocol_version {
            match common.kind {
                wire::kind::HELLO => self.send_refused(from, common.src_inc, wire::refuse::VERSION),
                wire::kind::REFUSED
                    if bytes.get(wire::COMMON_LEN) == Some(&wire::refuse::VERSION) =>
                {
                    self.on_refused(from, common, wire::refuse::VERSION)
                }
                _ => self.stats.malformed_dropped += 1,
            }
            return;
        }
        let pkt = match wire::parse_packet(bytes) {
            Ok(p) => p,
            Err(_) => {
                self.stats.malformed_dropped += 1;
                return;
            }
        };
        match pkt {
            Packet::Hello {
                common,
                window,
                start_seq,
            } => self.on_hello(from, common, window, start_seq),
            Packet::Refused { common, reason } => self.on_refused(from, common, reason),
            Packet::Data {
                common,
                seq,
                ack,
                window,
                frame,
            } => self.on_data(from, common, seq, ack, window, frame),
            Packet::Ack {
                common,
                ack,
                window,
                sack,
            } => {
                let known = common.dst_inc == self.inc
                    && self
                        .peers
                        .get(&from)
                        .is_some_and(|p| p.remote_inc == common.src_inc);
                if !known {
                    self.stats.stale_dropped += 1;
                    return;
                }
                self.on_ack(from, ack, window, Some(&sack));
            }
            Packet::Reset { common, echo } => self.on_reset(from, common, echo),
        }
    }

    pub(super) fn on_data(
        &mut self,
        from: SocketAddr,
        common: Common,
        seq: u64,
        ack: u64,
        window: u32,
        frame: &[u8],
    ) {
        if !self.conn_matches(from, &common) {
            self.stats.stale_dropped += 1;
            if common.src_inc != 0 {
                let mut b = Vec::with_capacity(32);
                wire::encode_packet(
                    &mut b,
                    &Packet::Reset {
                        common: self.common(wire::kind::RESET, common.src_inc),
                        echo: common.dst_inc,
                    },
                );
                self.push_packet(from, b);
            }
            return;
        }
        self.on_ack(from, ack, window, None);
        let now = self.now;
        let max_window = self.cfg.recv_window_packets as u64;
        let dedup_off = self.cfg.testing_disable_dedup;
        let ack_delay = self.cfg.ack_delay;
        let window_now = self.last_window;
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        if !p.ack_needed {
            p.ack_needed = true;
            p.ack_deadline = now.plus(ack_delay);
        }
        p.last_rx = now;
        if seq != p.rx_next || !p.rx_buf.is_empty() {
            // Duplicates, gaps, packets beyond the window and a packet that fills a gap
            // are answered at once, so a sender in recovery learns quickly.
            p.ack_now = true;
        } else {
            p.rx_since_ack += 1;
            // With a small window (many active peers) half of it must not wait for the
            // delayed acknowledgement, or the sender stalls.
            if p.rx_since_ack >= ACK_EVERY.min((window_now / 2).max(1)) {
                p.ack_now = true;
            }
        }
        if seq < p.rx_next {
            self.stats.duplicates_dropped += 1;
            if dedup_off {
                let f = frame.to_vec();
                self.process_frame(from, &f);
            }
            return;
        }
        if seq >= p.rx_next + max_window {
            self.stats.window_dropped += 1;
            return;
        }
        if seq > p.rx_next {
            if let std::collections::btree_map::Entry::Vacant(e) = p.rx_buf.entry(seq) {
                e.insert(frame.to_vec());
                self.stats.reordered += 1;
            } else {
                self.stats.duplicates_dropped += 1;
            }
            return;
        }
        p.rx_next += 1;
        self.frame_direct = true;
        self.process_frame(from, frame);
        self.frame_direct = false;
        loop {
            let Some(p) = self.peers.get_mut(&from) else {
                return;
            };
            let next = p.rx_next;
            match p.rx_buf.remove(&next) {
                Some(f) => {
                    p.rx_next += 1;
                    self.process_frame(from, &f);
                }
                None => break,
            }
        }
    }

    pub(super) fn verdict(&self, hdr: &MsgHeader) -> Result<(), ErrorCode> {
        if hdr.dst_tag != self.cfg.tag.0 {
            return Err(ErrorCode::BadTag);
        }
        match hdr.class {
            Class::Medium if hdr.total_len as usize > self.cfg.max_medium_bytes => {
                return Err(ErrorCode::Congested)
            }
            Class::Bulk if hdr.kind != MsgKind::Bounce => {
                let end = hdr.bulk_off.checked_add(hdr.total_len as u64);
                if end.is_none_or(|e| e > self.segment.len() as u64) {
                    return Err(ErrorCode::SegmentBounds);
                }
            }
            Class::Small if hdr.total_len != 0 => return Err(ErrorCode::Congested),
            _ => {}
        }
        match hdr.kind {
            MsgKind::Oneway | MsgKind::Request => {
                if !self
                    .handler_present
                    .get(hdr.handler as usize)
                    .copied()
                    .unwrap_or(false)
                {
                    return Err(ErrorCode::NoHandler);
                }
            }
            MsgKind::Reply => {
                let Some(r) = self.requests.get(&hdr.req_id) else {
                    return Err(ErrorCode::ReplyRejected);
                };
                if hdr.token_inc != self.inc {
                    return Err(ErrorCode::ReplyRejected);
                }
                if r.gather.is_none()
                    && !self
                        .handler_present
                        .get(hdr.handler as usize)
                        .copied()
                        .unwrap_or(false)
                {
                    return Err(ErrorCode::NoHandler);
                }
            }
            MsgKind::Bounce => {}
        }
        Ok(())
    }

    pub(super) fn process_frame(&mut self, from: SocketAddr, frame: &[u8]) {
        let parsed = match wire::parse_frame(frame) {
            Ok(f) => f,
            Err(_) => {
                self.stats.malformed_dropped += 1;
                if let Some(p) = self.peers.get_mut(&from) {
                    p.reasm = None;
                }
                return;
            }
        };
        match parsed {
            Frame::First {
                hdr,
                args,
                token,
                payload,
            } => {
                let abandoned = self
                    .peers
                    .get_mut(&from)
                    .and_then(|p| p.reasm.take())
                    .is_some();
                if abandoned {
                    self.stats.malformed_dropped += 1;
                }
                let verdict = self.verdict(&hdr);
                let keep = match hdr.class {
                    Class::Medium => (hdr.total_len as usize) <= self.cfg.max_medium_bytes,
                    Class::Bulk => verdict.is_ok() && hdr.kind != MsgKind::Bounce,
                    Class::Small => false,
                };
                let mut r = Reassembly {
                    hdr,
                    args,
                    token,
                    verdict,
                    buf: Vec::new(),
                    received: 0,
                    inline: None,
                };
                // A medium that arrives whole, in order, for a handler (not a gather, not
                // a bounce) stays in the datagram: no copy.
                if keep
                    && hdr.class == Class::Medium
                    && r.verdict.is_ok()
                    && payload.len() == hdr.total_len as usize
                    && matches!(
                        hdr.kind,
                        MsgKind::Oneway | MsgKind::Request | MsgKind::Reply
                    )
                    && !(hdr.kind == MsgKind::Reply
                        && self
                            .requests
                            .get(&hdr.req_id)
                            .is_none_or(|q| q.gather.is_some()))
                {
                    if let (true, Some((base, len))) = (self.frame_direct, self.inline_datagram) {
                        let off = (payload.as_ptr() as usize).wrapping_sub(base);
                        if off.checked_add(payload.len()).is_some_and(|e| e <= len) {
                            r.inline = Some((off, payload.len()));
                            r.received = payload.len();
                            self.finish_or_park(from, r);
                            return;
                        }
                    }
                }
                if keep && hdr.class == Class::Medium {
                    r.buf.reserve_exact(hdr.total_len as usize);
                }
                if self.caps.bulk_placement
                    && hdr.class == Class::Bulk
                    && hdr.kind != MsgKind::Bounce
                {
                    // The transport placed the data (or, for a refused tag or range, the
                    // sender's transport sent the header alone): no fragments follow.
                    r.received = hdr.total_len as usize;
                }
                self.absorb(&mut r, payload, keep);
                self.finish_or_park(from, r);
            }
            Frame::Cont { frag_off, payload } => {
                let Some(mut r) = self.peers.get_mut(&from).and_then(|p| p.reasm.take()) else {
                    self.stats.malformed_dropped += 1;
                    return;
                };
                if frag_off as usize != r.received
                    || r.received + payload.len() > r.hdr.total_len as usize
                {
                    self.stats.malformed_dropped += 1;
                    return;
                }
                let keep = match r.hdr.class {
                    Class::Medium => (r.hdr.total_len as usize) <= self.cfg.max_medium_bytes,
                    Class::Bulk => r.verdict.is_ok() && r.hdr.kind != MsgKind::Bounce,
                    Class::Small => false,
                };
                self.absorb(&mut r, payload, keep);
                self.finish_or_park(from, r);
            }
        }
    }

    pub(super) fn absorb(&mut self, r: &mut Reassembly, payload: &[u8], keep: bool) {
        if keep {
            match r.hdr.class {
                Class::Medium => r.buf.extend_from_slice(payload),
                Class::Bulk => {
                    let at = r.hdr.bulk_off as usize + r.received;
                    if let Some(dst) = self.segment.get_mut(at..at + payload.len()) {
                        dst.copy_from_slice(payload);
                    }
                }
                Class::Small => {}
            }
        }
        r.received += payload.len();
    }

    pub(super) fn finish_or_park(&mut self, from: SocketAddr, r: Reassembly) {
        if r.received < r.hdr.total_len as usize {
            if let Some(p) = self.peers.get_mut(&from) {
                p.reasm = Some(r);
            }
            return;
        }
        self.complete(from, r);
    }

    pub(super) fn complete(&mut self, from: SocketAddr, r: Reassembly) {
        let Reassembly {
            hdr,
            args,
            token,
            verdict,
            buf,
            inline,
            ..
        } = r;
        if inline.is_some() {
            self.inline_queued = true;
        }
        let vnet = self.cfg.vnet;
        if let Err(code) = verdict {
            match code {
                ErrorCode::BadTag => self.stats.bad_tag_dropped += 1,
                _ => self.stats.messages_rejected += 1,
            }
            if hdr.kind == MsgKind::Bounce {
                return; // never bounce a bounce
            }
            self.bounce(from, &hdr, &args, token, buf, code);
            return;
        }
        let bulk = (hdr.class == Class::Bulk).then_some((hdr.bulk_off, hdr.total_len as usize));
        let source = EndpointName { addr: from, vnet };
        match hdr.kind {
            MsgKind::Oneway | MsgKind::Request => {
                let token = if hdr.kind == MsgKind::Request {
                    Some(match token {
                        Some(t) => ReplyToken {
                            addr: t.addr,
                            vnet,
                            tag: t.tag,
                            req_id: t.req_id,
                            inc: t.inc,
                        },
                        None => ReplyToken {
                            addr: from,
                            vnet,
                            tag: hdr.src_tag,
                            req_id: hdr.req_id,
                            inc: self.peers.get(&from).map_or(0, |p| p.remote_inc),
                        },
                    })
                } else {
                    None
                };
                self.stats.messages_handled += 1;
                self.events.push_back(Event::Deliver(Delivery {
                    from,
                    kind: hdr.kind,
                    handler: hdr.handler,
                    args,
                    nargs: hdr.nargs as usize,
                    payload: buf,
                    inline,
                    bulk,
                    token,
                    request: None,
                }));
            }
            MsgKind::Reply => {
                let Some(req) = self.requests.remove(&hdr.req_id) else {
                    return;
                };
                self.deadlines.remove(&(req.deadline, hdr.req_id));
                self.stats.replies_handled += 1;
                match req.gather {
                    Some((gid, slot)) => self.gather_fill(
                        gid,
                        slot,
                        Ok(GatherReply {
                            source,
                            args: args[..hdr.nargs as usize].to_vec(),
                            payload: buf,
                            bulk,
                        }),
                    ),
                    None => self.events.push_back(Event::Deliver(Delivery {
                        from,
                        kind: MsgKind::Reply,
                        handler: hdr.handler,
                        args,
                        nargs: hdr.nargs as usize,
                        payload: buf,
                        inline,
                        bulk,
                        token: None,
                        request: Some(RequestId(hdr.req_id)),
                    })),
                }
            }
            MsgKind::Bounce => {
                let code = ErrorCode::from_wire(hdr.code).unwrap_or(ErrorCode::Unreachable);
                let u = Undeliverable {
                    code,
                    dest: source,
                    msg_id: MsgId(hdr.msg_id),
                    kind: hdr.orig_kind,
                    handler: hdr.handler,
                    args: args[..hdr.nargs as usize].to_vec(),
                    payload: buf,
                    bulk: (hdr.class == Class::Bulk)
                        .then_some((hdr.bulk_off, hdr.orig_len as usize)),
                    request: (hdr.orig_kind == MsgKind::Request && token.is_none())
                        .then_some(RequestId(hdr.req_id)),
                    delegated_for: token.map(|t| EndpointName { addr: t.addr, vnet }),
                };
                self.upcall(u);
            }
        }
    }

    /// Sends an undeliverable message back to its sender.
    pub(super) fn bounce(
        &mut self,
        to: SocketAddr,
        hdr: &MsgHeader,
        args: &[u64; MAX_ARGS],
        token: Option<TokenWire>,
        payload: Vec<u8>,
        code: ErrorCode,
    ) {
        let cap = 2 * self.cfg.send_queue_messages;
        self.flush_needed = true;
        let Some(p) = self.peers.get_mut(&to) else {
            return;
        };
        if p.queue.len() >= cap {
            self.stats.messages_rejected += 1;
            return;
        }
        let id = self.next_msg;
        self.next_msg += 1;
        let payload = if hdr.class == Class::Medium {
            payload
        } else {
            Vec::new()
        };
        let m = OutMsg {
            id,
            hdr: MsgHeader {
                kind: MsgKind::Bounce,
                class: hdr.class,
                handler: hdr.handler,
                code: code.to_wire(),
                orig_kind: hdr.kind,
                dst_tag: hdr.src_tag,
                src_tag: self.cfg.tag.0,
                req_id: hdr.req_id,
                total_len: payload.len() as u32,
                orig_len: hdr.total_len,
                bulk_off: hdr.bulk_off,
                token_inc: 0,
                msg_id: hdr.msg_id,
                nargs: hdr.nargs,
            },
            args: *args,
            token,
            payload,
            bulk_src: Vec::new(),
            sent: 0,
            first_sent: false,
            last_seq: 0,
        };
        p.queue.push_back(m);
    }
}
