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
            self.reset_stale(from, &common);
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
        p.data_received(seq, now, ack_delay, window_now);
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
        self.process_reordered(from);
    }

    /// Answers DATA on a connection this endpoint does not have (see `conn_matches`) with a
    /// RESET that names the incarnation the sender addressed: the sender fails its
    /// connection if that is still the one it has.
    fn reset_stale(&mut self, from: SocketAddr, common: &Common) {
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
    }

    /// Processes the frames of the reorder buffer that are now in order.
    #[inline]
    fn process_reordered(&mut self, from: SocketAddr) {
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
            } => self.on_first_fragment(from, hdr, args, token, payload),
            Frame::Cont { frag_off, payload } => self.on_cont_fragment(from, frag_off, payload),
        }
    }

    /// A message's first fragment: starts its reassembly (abandoning one left unfinished),
    /// or delivers it from the datagram if it came whole and may stay there.
    #[inline]
    fn on_first_fragment(
        &mut self,
        from: SocketAddr,
        hdr: MsgHeader,
        args: [u64; MAX_ARGS],
        token: Option<TokenWire>,
        payload: &[u8],
    ) {
        let abandoned = self
            .peers
            .get_mut(&from)
            .and_then(|p| p.reasm.take())
            .is_some();
        if abandoned {
            self.stats.malformed_dropped += 1;
        }
        let verdict = self.verdict(&hdr);
        let mut r = Reassembly {
            hdr,
            args,
            token,
            verdict,
            buf: Vec::new(),
            received: 0,
            inline: None,
        };
        let keep = self.keeps_payload(&r);
        if let Some((off, len)) = self.inline_place(&r, keep, payload) {
            r.inline = Some((off, len));
            r.received = len;
            self.finish_or_park(from, r);
            return;
        }
        if keep && hdr.class == Class::Medium {
            r.buf.reserve_exact(hdr.total_len as usize);
        }
        if self.caps.bulk_placement && hdr.class == Class::Bulk && hdr.kind != MsgKind::Bounce {
            // The transport placed the data (or, for a refused tag or range, the
            // sender's transport sent the header alone): no fragments follow.
            r.received = hdr.total_len as usize;
        }
        self.absorb(&mut r, payload, keep);
        self.finish_or_park(from, r);
    }

    /// A later fragment: added to the message being reassembled if it is the next one;
    /// otherwise the reassembly is dropped.
    #[inline]
    fn on_cont_fragment(&mut self, from: SocketAddr, frag_off: u32, payload: &[u8]) {
        let Some(mut r) = self.peers.get_mut(&from).and_then(|p| p.reasm.take()) else {
            self.stats.malformed_dropped += 1;
            return;
        };
        if frag_off as usize != r.received || r.received + payload.len() > r.hdr.total_len as usize
        {
            self.stats.malformed_dropped += 1;
            return;
        }
        let keep = self.keeps_payload(&r);
        self.absorb(&mut r, payload, keep);
        self.finish_or_park(from, r);
    }

    /// Whether the message's payload is kept: a medium's if within the size limit (also
    /// when rejected: it goes back in the bounce), a bulk message's (into the segment) only
    /// if accepted.
    #[inline]
    fn keeps_payload(&self, r: &Reassembly) -> bool {
        match r.hdr.class {
            Class::Medium => (r.hdr.total_len as usize) <= self.cfg.max_medium_bytes,
            Class::Bulk => r.verdict.is_ok() && r.hdr.kind != MsgKind::Bounce,
            Class::Small => false,
        }
    }

    /// Where `payload` (the whole of the message of `r`) lies in the datagram being
    /// received, if the message is delivered from there. A medium that arrives whole, in
    /// order, for a handler (not a gather, not a bounce) stays in the datagram: no copy.
    #[inline]
    fn inline_place(&self, r: &Reassembly, keep: bool, payload: &[u8]) -> Option<(usize, usize)> {
        let hdr = &r.hdr;
        let eligible = keep
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
                    .is_none_or(|q| q.gather.is_some()));
        if !eligible {
            return None;
        }
        let (true, Some((base, len))) = (self.frame_direct, self.inline_datagram) else {
            return None;
        };
        let off = (payload.as_ptr() as usize).wrapping_sub(base);
        off.checked_add(payload.len())
            .is_some_and(|e| e <= len)
            .then_some((off, payload.len()))
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
        if r.inline.is_some() {
            self.inline_queued = true;
        }
        if let Err(code) = r.verdict {
            match code {
                ErrorCode::BadTag => self.stats.bad_tag_dropped += 1,
                _ => self.stats.messages_rejected += 1,
            }
            if r.hdr.kind == MsgKind::Bounce {
                return; // never bounce a bounce
            }
            self.bounce(from, &r.hdr, &r.args, r.token, r.buf, code);
            return;
        }
        match r.hdr.kind {
            MsgKind::Oneway | MsgKind::Request => self.deliver_to_handler(from, r),
            MsgKind::Reply => self.deliver_reply(from, r),
            MsgKind::Bounce => self.return_bounced(from, r),
        }
    }

    /// Queues a one-way message or a request for its handler; a request with the token to
    /// reply with.
    #[inline]
    fn deliver_to_handler(&mut self, from: SocketAddr, r: Reassembly) {
        let Reassembly {
            hdr,
            args,
            token,
            buf,
            inline,
            ..
        } = r;
        let token = (hdr.kind == MsgKind::Request).then(|| self.reply_token(from, &hdr, token));
        self.stats.messages_handled += 1;
        self.events.push_back(Event::Deliver(Delivery {
            from,
            kind: hdr.kind,
            handler: hdr.handler,
            args,
            nargs: hdr.nargs as usize,
            payload: buf,
            inline,
            bulk: bulk_place(&hdr),
            token,
            request: None,
        }));
    }

    /// The token a request's handler replies with: the original requester's if the request
    /// was delegated (it carries that token), else the sender's.
    #[inline]
    fn reply_token(
        &self,
        from: SocketAddr,
        hdr: &MsgHeader,
        token: Option<TokenWire>,
    ) -> ReplyToken {
        let vnet = self.cfg.vnet;
        match token {
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
        }
    }

    /// Ends a request with its reply: into its gather's slot, or queued for the reply
    /// handler. Dropped if the request ended while the reply was reassembled (its deadline
    /// passed, or its connection failed).
    #[inline]
    fn deliver_reply(&mut self, from: SocketAddr, r: Reassembly) {
        let Reassembly {
            hdr,
            args,
            buf,
            inline,
            ..
        } = r;
        let Some(req) = self.requests.remove(&hdr.req_id) else {
            return;
        };
        self.deadlines.remove(&(req.deadline, hdr.req_id));
        self.stats.replies_handled += 1;
        let bulk = bulk_place(&hdr);
        match req.gather {
            Some((gid, slot)) => self.gather_fill(
                gid,
                slot,
                Ok(GatherReply {
                    source: EndpointName {
                        addr: from,
                        vnet: self.cfg.vnet,
                    },
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

    /// A message of ours came back undeliverable: to its request's gather or the upcall.
    #[inline]
    fn return_bounced(&mut self, from: SocketAddr, r: Reassembly) {
        let Reassembly {
            hdr,
            args,
            token,
            buf,
            ..
        } = r;
        let vnet = self.cfg.vnet;
        let code = ErrorCode::from_wire(hdr.code).unwrap_or(ErrorCode::Unreachable);
        let u = Undeliverable {
            code,
            dest: EndpointName { addr: from, vnet },
            msg_id: MsgId(hdr.msg_id),
            kind: hdr.orig_kind,
            handler: hdr.handler,
            args: args[..hdr.nargs as usize].to_vec(),
            payload: buf,
            bulk: (hdr.class == Class::Bulk).then_some((hdr.bulk_off, hdr.orig_len as usize)),
            request: (hdr.orig_kind == MsgKind::Request && token.is_none())
                .then_some(RequestId(hdr.req_id)),
            delegated_for: token.map(|t| EndpointName { addr: t.addr, vnet }),
        };
        self.upcall(u);
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

/// Where a bulk message's data lies in our segment: `(offset, len)`.
#[inline]
fn bulk_place(hdr: &MsgHeader) -> Option<(u64, usize)> {
    (hdr.class == Class::Bulk).then_some((hdr.bulk_off, hdr.total_len as usize))
}

impl Peer {
    /// Records that DATA `seq` arrived at `now`: an acknowledgement is owed, in this flush
    /// or within `ack_delay`. `window` is the receive window last advertised.
    #[inline]
    fn data_received(&mut self, seq: u64, now: Time, ack_delay: std::time::Duration, window: u32) {
        if !self.ack_needed {
            self.ack_needed = true;
            self.ack_deadline = now.plus(ack_delay);
        }
        self.last_rx = now;
        if seq != self.rx_next || !self.rx_buf.is_empty() {
            // Duplicates, gaps, packets beyond the window and a packet that fills a gap
            // are answered at once, so a sender in recovery learns quickly.
            self.ack_now = true;
        } else {
            self.rx_since_ack += 1;
            // With a small window (many active peers) half of it must not wait for the
            // delayed acknowledgement, or the sender stalls.
            if self.rx_since_ack >= ACK_EVERY.min((window / 2).max(1)) {
                self.ack_now = true;
            }
        }
    }
}
