//! Connections: the handshake (HELLO, its acknowledgement, refusals with a reason, resets),
//! incarnations, and what the transport reports of a peer (progress, failure).

use super::*;

impl Core {
    pub(super) fn common(&self, kind: u8, dst_inc: u64) -> Common {
        common_header(&self.cfg, self.inc, kind, dst_inc)
    }

    /// The transport moved data towards `addr` (`Transport::take_progress`) at time `at`:
    /// the peer's unreachable clock restarts there, as if it had acknowledged.
    pub fn peer_progressed(&mut self, addr: SocketAddr, at: Time) {
        let now = self.now.max(at);
        match self.peers.get_mut(&addr) {
            Some(p) if p.state == SendState::Open => p.last_progress = p.last_progress.max(now),
            Some(p) => {
                if let SendState::Connecting { last_hello, .. } = p.state {
                    p.state = SendState::Connecting {
                        since: now,
                        last_hello,
                    };
                }
            }
            None => {}
        }
    }

    /// The transport lost the path to `addr` (a queue pair error, or a connection replaced
    /// because the peer restarted): what was sent on it may be lost, so every message sent
    /// and not acknowledged returns through the upcall as `Unreachable`. Queued messages
    /// stay; the send direction re-opens with a HELLO.
    pub fn peer_failed(&mut self, addr: SocketAddr) {
        self.fail_sent(addr, ErrorCode::Unreachable);
        // What is still queued re-opens the connection at the next flush.
        self.flush_needed = true;
    }

    pub(super) fn send_refused(&mut self, to: SocketAddr, dst_inc: u64, reason: u8) {
        let mut b = Vec::with_capacity(32);
        wire::encode_packet(
            &mut b,
            &Packet::Refused {
                common: self.common(wire::kind::REFUSED, dst_inc),
                reason,
            },
        );
        self.push_packet(to, b);
    }

    /// Sends HELLO (open our direction) or HELLO_ACK (answer one).
    pub(super) fn send_hello(&mut self, to: SocketAddr, kind: u8, dst_inc: u64, start_seq: u64) {
        let window = self.advertised_window();
        let mut b = Vec::with_capacity(40);
        wire::encode_packet(
            &mut b,
            &Packet::Hello {
                common: self.common(kind, dst_inc),
                window,
                start_seq,
            },
        );
        self.push_packet(to, b);
    }

    pub(super) fn on_hello(
        &mut self,
        from: SocketAddr,
        common: Common,
        window: u32,
        start_seq: u64,
    ) {
        if start_seq == 0 || common.src_inc == 0 {
            self.stats.malformed_dropped += 1;
            return;
        }
        if common.vnet != self.cfg.vnet {
            if common.kind == wire::kind::HELLO {
                self.send_refused(from, common.src_inc, wire::refuse::VNET);
            } else {
                self.stats.stale_dropped += 1;
            }
            return;
        }
        if common.kind == wire::kind::HELLO_ACK && common.dst_inc != self.inc {
            self.stats.stale_dropped += 1;
            return;
        }
        let peer = self.peers.entry(from).or_insert_with(|| Peer::new(from));
        if peer.retired.contains(&common.src_inc) {
            // A late packet of an incarnation that has since been replaced.
            self.stats.stale_dropped += 1;
            return;
        }
        let known = peer.remote_inc;
        if known != 0 && known != common.src_inc {
            // A new incarnation: nothing sent to the old one may reach it.
            self.fail_sent(from, ErrorCode::Unreachable);
            if let Some(p) = self.peers.get_mut(&from) {
                if p.retired.len() >= RETIRED_INCARNATIONS {
                    p.retired.pop_front();
                }
                p.retired.push_back(known);
                p.rx_valid = false;
                p.rx_buf.clear();
                p.reasm = None;
            }
        }
        let now = self.now;
        let window = window.clamp(1, MAX_WINDOW);
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        p.remote_inc = common.src_inc;
        p.remote_window = window;
        let reply_needed = common.kind == wire::kind::HELLO;
        if common.kind == wire::kind::HELLO {
            if !p.rx_valid {
                p.rx_valid = true;
                p.rx_next = start_seq;
                p.rx_buf.clear();
                p.reasm = None;
            } else if start_seq > p.rx_next {
                // The sender gave up on (and returned) everything before start_seq.
                p.rx_next = start_seq;
                let keep = p.rx_buf.split_off(&start_seq);
                p.rx_buf = keep;
                p.reasm = None;
            }
        } else if let SendState::Connecting { .. } = p.state {
            p.state = SendState::Open;
            p.last_progress = now;
            p.backoff = 0;
            self.stats.handshakes += 1;
        }
        if reply_needed {
            let next = self.peers.get(&from).map_or(1, |p| p.next_seq);
            self.send_hello(from, wire::kind::HELLO_ACK, common.src_inc, next);
        }
    }

    pub(super) fn on_refused(&mut self, from: SocketAddr, common: Common, reason: u8) {
        if common.dst_inc != self.inc {
            self.stats.stale_dropped += 1;
            return;
        }
        let connecting = self
            .peers
            .get(&from)
            .is_some_and(|p| matches!(p.state, SendState::Connecting { .. }));
        if !connecting {
            self.stats.stale_dropped += 1;
            return;
        }
        let code = if reason == wire::refuse::VERSION {
            ErrorCode::VersionMismatch {
                local: self.cfg.protocol_version,
                remote: common.version,
            }
        } else {
            ErrorCode::NoEndpoint
        };
        self.fail_all(from, code);
    }

    pub(super) fn on_reset(&mut self, from: SocketAddr, common: Common, echo: u64) {
        if common.dst_inc != self.inc {
            self.stats.stale_dropped += 1;
            return;
        }
        let matches = self.peers.get(&from).is_some_and(|p| {
            p.remote_inc != 0 && p.remote_inc == echo && p.state == SendState::Open
        });
        if matches {
            self.fail_all(from, ErrorCode::Unreachable);
        } else {
            self.stats.stale_dropped += 1;
        }
    }

    pub(super) fn conn_matches(&self, from: SocketAddr, common: &Common) -> bool {
        common.dst_inc == self.inc
            && self
                .peers
                .get(&from)
                .is_some_and(|p| p.remote_inc == common.src_inc && p.rx_valid)
    }
}

/// The common header of a packet of `kind` from the endpoint with `cfg` and incarnation
/// `inc` ([`Core::common`], for where a peer is borrowed from the engine).
#[inline]
pub(super) fn common_header(cfg: &Config, inc: u64, kind: u8, dst_inc: u64) -> Common {
    Common {
        version: cfg.protocol_version,
        kind,
        vnet: cfg.vnet,
        src_inc: inc,
        dst_inc,
    }
}
