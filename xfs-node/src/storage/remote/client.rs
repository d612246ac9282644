//! The client side: [`RemoteStore`], itself a [`FragmentStore`], so a log stripes over
//! remote servers as over local stores.

use super::proto::*;
use super::*;

/// A reply as the client's handler queues it.
#[derive(Debug)]
struct Reply {
    args: Vec<u64>,
    payload: Vec<u8>,
    failed: bool,
}

/// A fragment store on a remote storage server, over AM.
pub struct RemoteStore<T: Transport> {
    ep: Endpoint<T>,
    server: String,
    base: u64,
    frag: usize,
    depth: usize,
    replies: Arc<Mutex<VecDeque<Reply>>>,
    /// Called while waiting for replies (the simulation steps the server and the clock).
    pump: Box<dyn FnMut() + Send>,
    timeout: Duration,
    /// The server stopped answering: every call fails at once (no second timeout per
    /// call: degraded reads go straight to parity).
    dead: bool,
    /// The server's free slots as its last put or stat reply said, less what was put
    /// since: a write checks room against it and asks the server (a `Stat` round trip)
    /// only when it looks too small. `None`: ask.
    free_hint: Option<usize>,
    /// `Stat` requests sent (a write sends one only when its room is in doubt).
    stats_asked: u64,
    /// What `write_begin` or `sync_begin` sent and `finish` waits for.
    begun: Option<Begun>,
    /// When `try_finish` gives up on the server: the call's timeout after the last answer
    /// (in the transport's nanoseconds: a simulated transport's virtual time).
    begun_deadline: u64,
    /// The error of a begun request that another request had to wait for before its
    /// caller's `finish`: that `finish` returns it.
    unclaimed: Option<StoreError>,
}

/// Requests sent by a `*_begin`, not yet answered.
enum Begun {
    /// Puts of these fragments, one per slot from 0; `failed`: the first put that failed
    /// (to send, or at the server); `left`: replies still due.
    Puts {
        ids: Vec<FragmentId>,
        failed: Option<StoreError>,
        left: usize,
    },
    /// Puts of these fragments (of these lengths), already in slots 0.. of this client's
    /// window, waiting for the server's room (a `Stat` was sent): sent when it answers.
    Room {
        ids: Vec<FragmentId>,
        lens: Vec<usize>,
    },
    /// A sync.
    Sync,
}

impl<T: Transport> RemoteStore<T> {
    /// Connect to the server `name`/`tag` over `ep` (whose segment must hold `2 * depth`
    /// fragments), with up to `depth` requests outstanding. `pump` runs while waiting
    /// (a no-op over a real network, where the server runs on its own).
    pub fn connect(
        ep: Endpoint<T>,
        name: EndpointName,
        tag: Tag,
        depth: usize,
        pump: Box<dyn FnMut() + Send>,
    ) -> Result<RemoteStore<T>, StoreError> {
        Self::connect_as(ep, name, tag, depth, pump, (0, 0))
    }

    /// [`RemoteStore::connect`] as the client `identity` (nonzero: who it is, the same
    /// across reconnections from new addresses, [`client_identity`]) in `generation`: the
    /// server gives it the window of its earlier connection, and frees that one, instead
    /// of a new window for each address. A connection of an older generation than the
    /// newest the server has seen for that identity is refused, and one of a newer
    /// generation fences the earlier connection (its window goes): whoever writes a log
    /// now (its node, or the member that took it over in a later membership epoch) is
    /// the only one whose writes land.
    pub fn connect_as(
        mut ep: Endpoint<T>,
        name: EndpointName,
        tag: Tag,
        depth: usize,
        pump: Box<dyn FnMut() + Send>,
        (identity, generation): (u64, u64),
    ) -> Result<RemoteStore<T>, StoreError> {
        let server = name.addr.to_string();
        ep.map(0, name, tag)
            .map_err(|e| StoreError::Config(e.to_string()))?;
        let replies: Arc<Mutex<VecDeque<Reply>>> = Arc::new(Mutex::new(VecDeque::new()));
        let r = replies.clone();
        ep.register(CLIENT_HANDLER, move |ctx, m| {
            let payload = match m.bulk {
                Some((off, len)) => ctx
                    .segment()
                    .get(off as usize..off as usize + len)
                    .map(|d| d.to_vec())
                    .unwrap_or_default(),
                None => m.payload.to_vec(),
            };
            lock(&r).push_back(Reply {
                args: m.args.to_vec(),
                payload,
                failed: false,
            });
        })
        .map_err(|e| StoreError::Config(e.to_string()))?;
        let r = replies.clone();
        ep.set_upcall(move |_, u| {
            lock(&r).push_back(Reply {
                args: u.args.clone(),
                payload: Vec::new(),
                failed: true,
            })
        });
        let mut s = RemoteStore {
            ep,
            server,
            base: 0,
            frag: 0,
            depth,
            replies,
            pump,
            timeout: Duration::from_secs(10),
            dead: false,
            free_hint: None,
            stats_asked: 0,
            begun: None,
            begun_deadline: 0,
            unclaimed: None,
        };
        let r = s.call(
            &[Op::Hello as u64, depth as u64, identity, generation],
            FragmentId {
                segment: 0,
                index: 0,
            },
        )?;
        if r.args.first() == Some(&(Status::Fenced as u64)) {
            return Err(StoreError::Config(format!(
                "storage server {} refused client {identity:#x} of generation {generation}: \
                 a newer generation ({}) of it connected (another node took over this log)",
                s.server,
                r.args.get(1).copied().unwrap_or(0)
            )));
        }
        if r.args.first() != Some(&0) {
            return Err(StoreError::Config(format!(
                "storage server {} has no room for another client at depth {depth} (it allows {})",
                s.server,
                r.args.get(3).copied().unwrap_or(0)
            )));
        }
        s.base = r.args[1];
        s.frag = r.args[2] as usize;
        if s.ep.segment().len() < 2 * depth * s.frag {
            return Err(StoreError::Config(format!(
                "the client's AM segment has {} bytes, {} needed: raise Config::segment_bytes",
                s.ep.segment().len(),
                2 * depth * s.frag
            )));
        }
        Ok(s)
    }

    /// `Stat` requests sent so far.
    pub fn stats_asked(&self) -> u64 {
        self.stats_asked
    }

    /// How long a call waits for the server before it fails (default 10 s).
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    fn unreachable(&self) -> StoreError {
        StoreError::Io {
            path: format!("storage server {}", self.server),
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer (dead or partitioned)",
            ),
        }
    }

    /// Whether the server stopped answering.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Wait for the next reply.
    fn next_reply(&mut self) -> Result<Reply, StoreError> {
        if self.dead {
            return Err(self.unreachable());
        }
        let deadline = self.deadline();
        loop {
            if let Some(r) = lock(&self.replies).pop_front() {
                if r.failed {
                    self.dead = true;
                    return Err(self.unreachable());
                }
                return Ok(r);
            }
            let work = self.ep.poll(256).map_err(|e| StoreError::Io {
                path: format!("storage server {}", self.server),
                source: std::io::Error::other(e.to_string()),
            })?;
            (self.pump)();
            if work == 0 {
                if self.clock_ns() > deadline {
                    self.dead = true;
                    return Err(self.unreachable());
                }
                let _ = self.ep.wait(Some(Duration::from_micros(200)));
            }
        }
    }

    /// Send a request, retrying while the endpoint is full.
    fn send(&mut self, msg: AmMsg<'_>) -> Result<(), StoreError> {
        if self.dead {
            return Err(self.unreachable());
        }
        loop {
            match self.ep.request(0, msg) {
                Ok(_) => return Ok(()),
                Err(AmError::WouldBlock) => {
                    let _ = self.ep.poll(256);
                    (self.pump)();
                }
                Err(e) => return Err(StoreError::Config(format!("storage request: {e}"))),
            }
        }
    }

    fn call(&mut self, args: &[u64], id: FragmentId) -> Result<Reply, StoreError> {
        self.finish_begun();
        self.send(AmMsg::small(SERVER_HANDLER, args))?;
        let r = self.next_reply()?;
        match r.args.first() {
            Some(0) => Ok(r),
            Some(s) if args[0] != Op::Hello as u64 => {
                Err(Status::from_wire(*s).error(id, &self.server))
            }
            _ => Ok(r),
        }
    }
}

impl<T: Transport> RemoteStore<T> {
    /// Wait for a begun write or sync before another request (so its replies do not
    /// answer that one); an error is kept for the begun request's own `finish`.
    fn finish_begun(&mut self) {
        if self.begun.is_some() {
            if let Err(e) = self.finish() {
                self.unclaimed = Some(e);
            }
        }
    }

    /// Put fragment `id` through slot `k` of this client's window: copied into the slot,
    /// sent as a bulk into the same slot of the server's window for it.
    fn send_put(&mut self, k: usize, id: FragmentId, data: &[u8]) -> Result<(), StoreError> {
        self.fill_slot(k, data);
        self.send_slot(k, id, data.len())
    }

    /// Copy `data` into slot `k` of this client's window.
    fn fill_slot(&mut self, k: usize, data: &[u8]) {
        let at = k * self.frag;
        self.ep.segment_mut()[at..at + data.len()].copy_from_slice(data);
    }

    /// Put fragment `id` from slot `k` (`len` bytes) into the same slot of the server's
    /// window for this client.
    fn send_slot(&mut self, k: usize, id: FragmentId, len: usize) -> Result<(), StoreError> {
        let at = k * self.frag;
        let args = [Op::Put as u64, id.segment, id.index as u64, k as u64];
        let src = [(at, len)];
        let dst = self.base + at as u64;
        self.send(AmMsg::bulk(SERVER_HANDLER, &args, &src, dst))
    }

    /// Send the puts of fragments already in slots 0..: the begun request becomes those
    /// puts (a send that fails is their error).
    fn send_slots(&mut self, ids: Vec<FragmentId>, lens: Vec<usize>) {
        let mut sent = Vec::with_capacity(ids.len());
        let mut failed = None;
        for (k, (id, len)) in ids.into_iter().zip(lens).enumerate() {
            if let Err(e) = self.send_slot(k, id, len) {
                failed = Some(e);
                break;
            }
            sent.push(id);
        }
        let left = sent.len();
        self.begun = Some(Begun::Puts {
            ids: sent,
            failed,
            left,
        });
    }

    /// The transport's clock, in nanoseconds (virtual time on a simulated transport).
    fn clock_ns(&self) -> u64 {
        self.ep.transport().now().0
    }

    /// When a wait that starts now gives up on the server.
    fn deadline(&self) -> u64 {
        let timeout = u64::try_from(self.timeout.as_nanos()).unwrap_or(u64::MAX);
        self.clock_ns().saturating_add(timeout)
    }

    /// Let what was just requested leave now (the endpoint sends at its next poll), so
    /// that the server works while this thread begins on the next store.
    fn push_out(&mut self) {
        let _ = self.ep.poll(256);
        (self.pump)();
    }

    /// The room for `n` more fragments, as the server said last (asked again if that
    /// looks too small): `NoSpace` if there is not.
    fn check_room(&mut self, n: usize) -> Result<(), StoreError> {
        let free = match self.free_hint {
            Some(f) if f >= n => f,
            _ => self.free_slots()?,
        };
        if free < n {
            return Err(StoreError::NoSpace { free, needed: n });
        }
        Ok(())
    }

    /// The begun request's outcome if nothing more is due for it (nothing begun: the error
    /// of one that another request had to wait for, if any).
    fn begun_done(&mut self) -> Option<Result<(), StoreError>> {
        match &mut self.begun {
            None => Some(self.unclaimed.take().map_or(Ok(()), Err)),
            Some(Begun::Puts {
                failed, left: 0, ..
            }) => {
                let failed = failed.take();
                self.begun = None;
                Some(failed.map_or(Ok(()), Err))
            }
            Some(_) => None,
        }
    }

    /// Count reply `r` against the begun request: its outcome once its last reply is in.
    fn begun_reply(&mut self, r: Reply) -> Option<Result<(), StoreError>> {
        let none = FragmentId {
            segment: 0,
            index: 0,
        };
        if matches!(self.begun, Some(Begun::Puts { .. })) {
            self.note_put_reply(&r);
        }
        let server = self.server.clone();
        if let Some(Begun::Room { ids, .. }) = &self.begun {
            let needed = ids.len();
            let free = r.args.get(1).copied().unwrap_or(0) as usize;
            match r.args.first() {
                Some(0) if free >= needed => {
                    self.free_hint = Some(free);
                    if let Some(Begun::Room { ids, lens }) = self.begun.take() {
                        self.send_slots(ids, lens);
                        self.push_out();
                    }
                    return self.begun_done();
                }
                Some(0) => {
                    self.free_hint = Some(free);
                    self.begun = None;
                    return Some(Err(StoreError::NoSpace { free, needed }));
                }
                s => {
                    self.begun = None;
                    let s = Status::from_wire(s.copied().unwrap_or(u64::MAX));
                    return Some(Err(s.error(none, &server)));
                }
            }
        }
        match self.begun.as_mut()? {
            Begun::Room { .. } => None,
            Begun::Sync => {
                self.begun = None;
                Some(match r.args.first() {
                    Some(0) => Ok(()),
                    Some(s) => Err(Status::from_wire(*s).error(none, &server)),
                    None => Err(Status::Refused.error(none, &server)),
                })
            }
            Begun::Puts { ids, failed, left } => {
                let k = r.args.get(1).copied().unwrap_or(0) as usize;
                if r.args.first() != Some(&0) {
                    let s = Status::from_wire(r.args.first().copied().unwrap_or(u64::MAX));
                    let id = ids.get(k).copied().unwrap_or(none);
                    failed.get_or_insert(s.error(id, &server));
                }
                *left = left.saturating_sub(1);
                self.begun_done()
            }
        }
    }

    /// Note a put's reply: the server's free slots after it (a server that does not say:
    /// one fewer).
    fn note_put_reply(&mut self, r: &Reply) {
        self.free_hint = match r.args.get(2) {
            Some(f) => Some(*f as usize),
            None => self.free_hint.map(|f| f.saturating_sub(1)),
        };
    }
}

impl<T: Transport> FragmentStore for RemoteStore<T> {
    fn fragment_bytes(&self) -> usize {
        self.frag
    }

    fn free_slots(&mut self) -> Result<usize, StoreError> {
        self.stats_asked += 1;
        let r = self.call(
            &[Op::Stat as u64],
            FragmentId {
                segment: 0,
                index: 0,
            },
        )?;
        let free = r.args.get(1).copied().unwrap_or(0) as usize;
        self.free_hint = Some(free);
        Ok(free)
    }

    fn write(&mut self, fragments: &[(FragmentId, &[u8])]) -> Result<(), StoreError> {
        self.finish_begun();
        check_sizes(fragments, self.frag)?;
        // All or nothing on space, as the trait says (checked first, against what the
        // server said last, asking it again if that looks too small; another client may
        // still take the room in between, then some fragments of the batch are written).
        self.check_room(fragments.len())?;
        let mut free_k: Vec<usize> = (0..self.depth).rev().collect();
        let (mut next, mut outstanding) = (0, 0);
        let mut first_err: Option<StoreError> = None;
        while next < fragments.len() || outstanding > 0 {
            while next < fragments.len() && first_err.is_none() {
                let Some(k) = free_k.pop() else { break };
                let (id, data) = fragments[next];
                self.send_put(k, id, data)?;
                next += 1;
                outstanding += 1;
            }
            if outstanding == 0 {
                break;
            }
            let r = self.next_reply()?;
            outstanding -= 1;
            let k = r.args.get(1).copied().unwrap_or(0) as usize;
            free_k.push(k.min(self.depth - 1));
            self.note_put_reply(&r);
            if r.args.first() != Some(&0) && first_err.is_none() {
                let id = fragments.get(next.saturating_sub(1)).map_or(
                    FragmentId {
                        segment: 0,
                        index: 0,
                    },
                    |f| f.0,
                );
                first_err = Some(Status::from_wire(r.args[0]).error(id, &self.server));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        self.call(
            &[Op::Sync as u64],
            FragmentId {
                segment: 0,
                index: 0,
            },
        )
        .map(|_| ())
    }

    /// Sends every put at once if they fit the window (else writes them all now).
    fn write_begin(&mut self, fragments: &[(FragmentId, &[u8])]) -> Result<(), StoreError> {
        self.finish_begun();
        if fragments.len() > self.depth {
            return self.write(fragments);
        }
        check_sizes(fragments, self.frag)?;
        // Every fragment into its slot now; the puts leave from there, at once if the room
        // the server said last is enough, else when it answers a `Stat` (the caller may be
        // waiting on other stores meanwhile: this one must not wait here).
        for (k, (_, data)) in fragments.iter().enumerate() {
            self.fill_slot(k, data);
        }
        let ids: Vec<FragmentId> = fragments.iter().map(|f| f.0).collect();
        let lens: Vec<usize> = fragments.iter().map(|f| f.1.len()).collect();
        match self.free_hint {
            Some(f) if f >= fragments.len() => self.send_slots(ids, lens),
            _ => {
                self.stats_asked += 1;
                self.send(AmMsg::small(SERVER_HANDLER, &[Op::Stat as u64]))?;
                self.begun = Some(Begun::Room { ids, lens });
            }
        }
        self.begun_deadline = self.deadline();
        self.push_out();
        Ok(())
    }

    fn sync_begin(&mut self) -> Result<(), StoreError> {
        self.finish_begun();
        self.send(AmMsg::small(SERVER_HANDLER, &[Op::Sync as u64]))?;
        self.begun = Some(Begun::Sync);
        self.begun_deadline = self.deadline();
        self.push_out();
        Ok(())
    }

    fn finish(&mut self) -> Result<(), StoreError> {
        loop {
            if let Some(done) = self.begun_done() {
                return done;
            }
            match self.next_reply() {
                Ok(r) => {
                    if let Some(done) = self.begun_reply(r) {
                        return done;
                    }
                }
                Err(e) => {
                    self.begun = None;
                    return Err(e);
                }
            }
        }
    }

    fn try_finish(&mut self) -> Option<Result<(), StoreError>> {
        if let Some(done) = self.begun_done() {
            return Some(done);
        }
        if self.dead {
            self.begun = None;
            return Some(Err(self.unreachable()));
        }
        let mut waited = false;
        loop {
            if let Err(e) = self.ep.poll(256) {
                self.begun = None;
                return Some(Err(StoreError::Io {
                    path: format!("storage server {}", self.server),
                    source: std::io::Error::other(e.to_string()),
                }));
            }
            (self.pump)();
            let mut answered = false;
            loop {
                let Some(r) = lock(&self.replies).pop_front() else {
                    break;
                };
                answered = true;
                if r.failed {
                    self.dead = true;
                    self.begun = None;
                    return Some(Err(self.unreachable()));
                }
                if let Some(done) = self.begun_reply(r) {
                    return Some(done);
                }
            }
            if answered {
                self.begun_deadline = self.deadline();
            } else if self.clock_ns() > self.begun_deadline {
                self.dead = true;
                self.begun = None;
                return Some(Err(self.unreachable()));
            }
            if waited || answered {
                return None;
            }
            // Nothing yet: wait a moment for the socket, then look once more.
            let _ = self.ep.wait(Some(Duration::from_micros(200)));
            waited = true;
        }
    }

    fn read(&mut self, ids: &[FragmentId]) -> Vec<Result<Vec<u8>, StoreError>> {
        self.finish_begun();
        let mut out: Vec<Option<Result<Vec<u8>, StoreError>>> = ids.iter().map(|_| None).collect();
        let mut slot_of: Vec<Option<usize>> = vec![None; self.depth];
        let mut free_k: Vec<usize> = (0..self.depth).rev().collect();
        let (mut next, mut outstanding) = (0, 0);
        while next < ids.len() || outstanding > 0 {
            while next < ids.len() {
                let Some(k) = free_k.pop() else { break };
                let id = ids[next];
                if let Err(e) = self.send(AmMsg::small(
                    SERVER_HANDLER,
                    &[Op::Get as u64, id.segment, id.index as u64, k as u64],
                )) {
                    out[next] = Some(Err(e));
                    free_k.push(k);
                    next += 1;
                    continue;
                }
                slot_of[k] = Some(next);
                next += 1;
                outstanding += 1;
            }
            if outstanding == 0 {
                break;
            }
            match self.next_reply() {
                Ok(r) => {
                    outstanding -= 1;
                    let k = r.args.get(1).copied().unwrap_or(0) as usize;
                    let Some(i) = slot_of.get_mut(k).and_then(|s| s.take()) else {
                        continue;
                    };
                    free_k.push(k);
                    out[i] = Some(match r.args.first() {
                        Some(0) => Ok(r.payload),
                        Some(s) => Err(Status::from_wire(*s).error(ids[i], &self.server)),
                        None => Err(Status::Refused.error(ids[i], &self.server)),
                    });
                }
                Err(_) => break,
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(self.unreachable())))
            .collect()
    }

    fn read_range(
        &mut self,
        id: FragmentId,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>, StoreError> {
        let args = [
            Op::Get as u64,
            id.segment,
            id.index as u64,
            0,
            offset as u64,
            len as u64,
        ];
        let r = self.call(&args, id)?;
        if r.payload.len() != len {
            return Err(StoreError::Config(format!(
                "storage server {} sent {} bytes of {id:?} for {len}",
                self.server,
                r.payload.len()
            )));
        }
        Ok(r.payload)
    }

    fn delete(&mut self, ids: &[FragmentId]) -> Result<(), StoreError> {
        self.finish_begun();
        for chunk in ids.chunks(LIST_PAGE) {
            let bytes = encode_ids(chunk);
            let slices = [bytes.as_slice()];
            self.send(AmMsg::medium(SERVER_HANDLER, &[Op::Delete as u64], &slices))?;
            let r = self.next_reply()?;
            if r.args.first() != Some(&0) {
                return Err(Status::from_wire(r.args[0]).error(chunk[0], &self.server));
            }
        }
        Ok(())
    }

    fn list(&mut self) -> Result<Vec<FragmentId>, StoreError> {
        let mut all = Vec::new();
        let mut after: Option<FragmentId> = None;
        loop {
            let args = match after {
                Some(a) => [Op::List as u64, a.segment, a.index as u64, 1],
                None => [Op::List as u64, 0, 0, 0],
            };
            let r = self.call(
                &args,
                FragmentId {
                    segment: 0,
                    index: 0,
                },
            )?;
            let page: Vec<FragmentId> = decode_ids(&r.payload);
            after = page.last().copied();
            all.extend(page);
            if r.args.get(2) != Some(&1) || after.is_none() {
                return Ok(all);
            }
        }
    }
}
