//! Connection set-up over the UDP side channel: a peer's queue pair created, its address
//! and keys exchanged (after the tag check), connected, replaced when the peer restarts,
//! failed when it is gone.

use super::*;

impl RdmaTransport {
    pub(super) fn new_peer(&mut self, to: SocketAddr) -> io::Result<()> {
        if self.peers.len() >= self.cfg.max_peers {
            return Err(io::Error::other(format!(
                "more than {} peers (RdmaConfig::max_peers)",
                self.cfg.max_peers
            )));
        }
        let mut qp = self.dev.create_qp(
            self.cfg.send_depth,
            self.cfg.recv_depth,
            self.cfg.max_inline,
        )?;
        let recv = self
            .dev
            .register_owned(self.slot * self.cfg.recv_depth as usize)?;
        let ring = self
            .dev
            .register_owned(self.slot * self.cfg.send_depth as usize)?;
        let id = self.next_id;
        self.next_id += 1;
        for i in 0..self.cfg.recv_depth as usize {
            qp.post_recv(((id as u64) << 32) | i as u64, &recv, i, self.slot)?;
        }
        self.nonce_ctr += 1;
        let nonce = mix(self.seed ^ self.nonce_ctr).max(1);
        let now = am_os::tsc::coarse_now_ns();
        self.peers.insert(
            to,
            Peer {
                id,
                qp,
                recv,
                ring,
                nonce,
                psn: (nonce as u32) & 0x00ff_ffff,
                remote: None,
                last_req: now,
                control: VecDeque::new(),
                pending: VecDeque::new(),
                outstanding: 0,
                posted: 0,
                stalled_since: None,
                last_probe: now,
                grants: HashMap::default(),
                parked: VecDeque::new(),
                imm_send: 0,
                imm_recv: 0,
                writing: None,
                progressed: false,
                writes_in_flight: 0,
            },
        );
        self.by_id.insert(id, to);
        Ok(())
    }

    pub(super) fn oob(&mut self, to: SocketAddr, kind: u8, echo: u64) {
        let Some(p) = self.peers.get(&to) else { return };
        let m = oob::Msg {
            kind,
            qpn: p.qp.qpn(),
            psn: p.psn,
            lid: self.dev.lid,
            gid: verbs::gid_of(self.addr.ip()),
            nonce: p.nonce,
            echo,
        };
        if kind == oob::REQ {
            self.stats.requests_sent += 1;
        }
        if kind == oob::PROBE {
            self.stats.probes_sent += 1;
        }
        // A lost datagram is repeated (REQ) or harmless (PROBE, REP: the REQ repeats).
        let _ = self.sock.send_to(&m.encode(), to);
    }

    /// Tears down the connection to `addr` and reports it failed, so the engine returns
    /// what it had sent on it as `Unreachable` and re-opens with a HELLO. Datagrams still
    /// waiting here are dropped (counted) rather than sent on the next connection: the
    /// engine has just returned their messages, which must not then arrive as well.
    pub(super) fn replace(&mut self, addr: SocketAddr) {
        let Some(p) = self.peers.remove(&addr) else {
            return;
        };
        trace!("{} connection to {addr} torn down", self.addr);
        self.by_id.remove(&p.id);
        self.stats.connections_replaced += 1;
        self.stats.dropped += p.pending.len() as u64;
        if !self.failed.contains(&addr) {
            self.failed.push(addr);
        }
    }

    pub(super) fn connect_peer(&mut self, addr: SocketAddr, m: &oob::Msg) -> io::Result<()> {
        let Some(p) = self.peers.get_mut(&addr) else {
            return Ok(());
        };
        let remote = RemoteQp {
            qpn: m.qpn,
            psn: m.psn,
            gid: m.gid,
            lid: m.lid,
        };
        p.qp.connect(&self.dev, &remote, p.psn)?;
        p.remote = Some((remote, m.nonce));
        self.stats.connects += 1;
        Ok(())
    }

    pub(super) fn on_oob(&mut self, from: SocketAddr, m: oob::Msg) {
        trace!(
            "{} <- {from}: kind {} qpn {} nonce {:x} echo {:x}; have {:?}",
            self.addr,
            m.kind,
            m.qpn,
            m.nonce,
            m.echo,
            self.peers
                .get(&from)
                .map(|p| (p.nonce, p.remote.map(|r| r.1), p.outstanding))
        );
        match m.kind {
            oob::REQ => {
                let state = self.peers.get(&from).map(|p| p.remote.map(|r| r.1));
                match state {
                    Some(Some(n)) if n == m.nonce => {
                        self.oob(from, oob::REP, m.nonce);
                        return;
                    }
                    Some(Some(_)) => {
                        // The peer restarted (or rebuilt its side): a new connection.
                        self.replace(from);
                        if self.new_peer(from).is_err() {
                            return;
                        }
                    }
                    Some(None) => {}
                    None => {
                        if self.new_peer(from).is_err() {
                            self.stats.dropped += 1;
                            return;
                        }
                    }
                }
                if self.connect_peer(from, &m).is_err() {
                    self.stats.error_completions += 1;
                    return;
                }
                self.oob(from, oob::REP, m.nonce);
                let _ = self.flush_peer(from);
            }
            oob::REP => {
                let Some(p) = self.peers.get(&from) else {
                    return;
                };
                if m.echo != p.nonce || p.remote.is_some() {
                    return;
                }
                if self.connect_peer(from, &m).is_err() {
                    self.stats.error_completions += 1;
                    return;
                }
                let _ = self.flush_peer(from);
            }
            _ => {
                // PROBE: if we do not hold the connection the prober believes in, open a
                // new one (the prober then replaces its stale queue pair).
                let ours = self
                    .peers
                    .get(&from)
                    .is_some_and(|p| p.nonce == m.echo && p.remote.is_some_and(|r| r.1 == m.nonce));
                if ours {
                    return;
                }
                if self.peers.contains_key(&from) {
                    self.replace(from);
                    if self.new_peer(from).is_err() {
                        return;
                    }
                } else if self.new_peer(from).is_err() {
                    return;
                }
                self.oob(from, oob::REQ, 0);
            }
        }
    }

    pub(super) fn poll_udp(&mut self) {
        let mut buf = [0u8; 128];
        for _ in 0..64 {
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) => match oob::Msg::decode(&buf[..n]) {
                    Some(m) => self.on_oob(from, m),
                    None => self.stats.malformed += 1,
                },
                Err(_) => break,
            }
        }
    }

    /// An error completion or a failed post: the queue pair is unusable. It is torn down
    /// at once; the next datagram to `addr` opens a new connection (a new nonce, so the
    /// peer replaces its side too).
    pub(super) fn fail_peer(&mut self, addr: SocketAddr) {
        trace!("{} connection to {addr} broken", self.addr);
        self.replace(addr);
    }
}
