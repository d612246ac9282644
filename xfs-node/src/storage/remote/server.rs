//! The storage server: a [`FragmentStore`] served over its own AM endpoint, each client
//! given a window of its segment at `hello`, puts and gets batched into one store call.

use super::proto::*;
use super::*;

/// A request as the server's handler queues it.
struct Pending {
    token: ReplyToken,
    args: Vec<u64>,
    /// Where a bulk put landed in the server's segment (offset, length): it stays there,
    /// in the sender's window slot, until the reply, so it is written from there.
    landed: Option<(u64, usize)>,
    payload: Vec<u8>,
}

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Clients served at once (windows in the segment).
    pub windows: usize,
    /// Requests in flight per client.
    pub depth: usize,
}

/// The storage server role: serves `store` over `ep`.
pub struct StorageServer<T: Transport, S: FragmentStore> {
    ep: Endpoint<T>,
    store: S,
    queue: Arc<Mutex<VecDeque<Pending>>>,
    frag: usize,
    depth: usize,
    windows: Vec<Option<(std::net::SocketAddr, u32)>>,
    clients: BTreeMap<(SocketAddr, u32), (usize, usize)>,
    /// Clients that said who they are (`RemoteStore::connect_as`): identity → address and
    /// the newest generation seen.
    identities: BTreeMap<u64, ((SocketAddr, u32), u64)>,
    /// Hellos refused because a newer generation of their identity had connected.
    pub fenced_hellos: u64,
    /// Windows freed because their client came back from a new address.
    pub windows_reclaimed: u64,
    /// Requests served.
    pub served: u64,
    /// Requests refused: a put outside its sender's window, or from a client without one.
    pub bad_requests: u64,
}

impl<T: Transport, S: FragmentStore> StorageServer<T, S> {
    /// A server over `ep`, whose segment must hold `windows * depth` fragments.
    pub fn new(mut ep: Endpoint<T>, store: S, opts: ServerOptions) -> Result<Self, StoreError> {
        let frag = store.fragment_bytes();
        let need = opts.windows * opts.depth * frag;
        if ep.segment().len() < need {
            return Err(StoreError::Config(format!(
                "the storage server's AM segment has {} bytes, {need} needed ({} windows x {} slots x {frag} bytes): raise Config::segment_bytes",
                ep.segment().len(),
                opts.windows,
                opts.depth
            )));
        }
        let queue: Arc<Mutex<VecDeque<Pending>>> = Arc::new(Mutex::new(VecDeque::new()));
        let q = queue.clone();
        ep.register(SERVER_HANDLER, move |_, m| {
            let Some(token) = m.token else { return };
            lock(&q).push_back(Pending {
                token,
                args: m.args.to_vec(),
                landed: m.bulk,
                payload: m.payload.to_vec(),
            });
        })
        .map_err(|e| StoreError::Config(e.to_string()))?;
        Ok(StorageServer {
            ep,
            store,
            queue,
            frag,
            depth: opts.depth,
            windows: vec![None; opts.windows],
            clients: BTreeMap::new(),
            identities: BTreeMap::new(),
            windows_reclaimed: 0,
            fenced_hellos: 0,
            served: 0,
            bad_requests: 0,
        })
    }

    /// The endpoint's name and tag, for clients to map.
    pub fn name(&self) -> (EndpointName, Tag) {
        (self.ep.name(), self.ep.tag())
    }

    /// Block until a request arrives, a timer is due, or `timeout` passes.
    pub fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        self.ep.wait(Some(timeout))
    }

    /// The store.
    pub fn store(&mut self) -> &mut S {
        &mut self.store
    }

    /// The endpoint (for its timeouts and statistics).
    pub fn endpoint(&self) -> &Endpoint<T> {
        &self.ep
    }

    /// Poll, then serve what arrived: consecutive puts as one store write, consecutive gets
    /// as one store read. Returns the work done.
    pub fn step(&mut self) -> Result<usize, TransportError> {
        let mut work = self.ep.poll(256)?;
        let mut batch: VecDeque<Pending> = lock(&self.queue).drain(..).collect();
        work += batch.len();
        while let Some(first) = batch.pop_front() {
            let op = first.args.first().copied().and_then(Op::from_wire);
            let mut group = vec![first];
            if matches!(op, Some(Op::Put | Op::Get)) {
                let wire = op.map(|o| o as u64);
                while batch
                    .front()
                    .is_some_and(|p| p.args.first().copied() == wire)
                {
                    group.extend(batch.pop_front());
                }
            }
            self.serve(op, group);
        }
        Ok(work)
    }

    fn reply(&mut self, token: ReplyToken, args: &[u64]) {
        // A reply that cannot leave (the client is gone) is reported by the AM upcall.
        let _ = self
            .ep
            .ctx()
            .reply(token, AmMsg::small(CLIENT_HANDLER, args));
        self.served += 1;
    }

    fn serve(&mut self, op: Option<Op>, group: Vec<Pending>) {
        match op {
            Some(Op::Hello) => group.into_iter().for_each(|p| self.hello(p)),
            Some(Op::Put) => self.put(group),
            Some(Op::Sync) => group.into_iter().for_each(|p| self.sync(p)),
            Some(Op::Get) => self.get(group),
            Some(Op::Delete) => group.into_iter().for_each(|p| self.delete(p)),
            Some(Op::Stat) => group.into_iter().for_each(|p| self.stat(p)),
            Some(Op::List) => group.into_iter().for_each(|p| self.list(p)),
            None => {
                for p in group {
                    self.reply(p.token, &[Status::Refused as u64]);
                }
            }
        }
    }

    /// Give the client a window of the segment (its own again if it has one), or refuse.
    fn hello(&mut self, p: Pending) {
        let key = client_of(&p);
        // A client that says who it is and comes from a new address (a restarted node, a
        // reconnection on a new port): its earlier connection's window is freed first.
        // A newer generation of it (the member that took over its log) fences the older
        // ones: an older one is refused, and the window of the one it replaces goes.
        let identity = p.args.get(2).copied().unwrap_or(0);
        let generation = p.args.get(3).copied().unwrap_or(0);
        if identity != 0 {
            if let Some((_, newest)) = self.identities.get(&identity) {
                if generation < *newest {
                    self.fenced_hellos += 1;
                    let newest = *newest;
                    self.reply(
                        p.token,
                        &[Status::Fenced as u64, newest, self.frag as u64, 0],
                    );
                    return;
                }
            }
            if let Some((old, _)) = self.identities.insert(identity, (key, generation)) {
                if old != key {
                    if let Some((w, _)) = self.clients.remove(&old) {
                        self.windows[w] = None;
                        self.windows_reclaimed += 1;
                    }
                }
            }
        }
        let window = match self.clients.get(&key) {
            Some((w, _)) => Some(*w),
            None => self.windows.iter().position(|w| w.is_none()),
        };
        let depth = p.args.get(1).copied().unwrap_or(0) as usize;
        match window {
            Some(w) if depth >= 1 && depth <= self.depth => {
                self.windows[w] = Some(key);
                self.clients.insert(key, (w, depth));
                let base = (w * self.depth * self.frag) as u64;
                self.reply(
                    p.token,
                    &[Status::Ok as u64, base, self.frag as u64, self.depth as u64],
                );
            }
            _ => self.reply(
                p.token,
                &[
                    Status::Refused as u64,
                    0,
                    self.frag as u64,
                    self.depth as u64,
                ],
            ),
        }
    }

    /// Whether a put landed inside its sender's own window.
    fn in_window(&self, p: &Pending) -> bool {
        let window = self.depth * self.frag;
        match (self.clients.get(&client_of(p)), p.landed) {
            (Some((w, _)), Some((off, len))) => {
                let start = (*w * window) as u64;
                off >= start && off + len as u64 <= start + window as u64
            }
            _ => false,
        }
    }

    /// A run of puts: one store write of those that landed in their windows.
    fn put(&mut self, group: Vec<Pending>) {
        // A put must land in its sender's own window (the segment is shared by every
        // client: one that writes elsewhere is refused, counted as a bad request).
        let ok: Vec<bool> = group.iter().map(|p| self.in_window(p)).collect();
        self.bad_requests += ok.iter().filter(|o| !**o).count() as u64;
        let status = {
            // Written straight from the segment (inside the window: checked above).
            let segment = self.ep.segment();
            let frags: Vec<(FragmentId, &[u8])> = group
                .iter()
                .zip(&ok)
                .filter(|(_, ok)| **ok)
                .filter_map(|(p, _)| {
                    let (off, len) = p.landed?;
                    Some((id_of(&p.args), &segment[off as usize..off as usize + len]))
                })
                .collect();
            match self.store.write(&frags) {
                Ok(()) => Status::Ok,
                Err(e) => Status::of(&e),
            }
        };
        // The free slots after the puts: the client checks its next write's room against
        // them rather than asking (`Stat`) every time.
        let free = self.store.free_slots().unwrap_or(0) as u64;
        for (p, ok) in group.into_iter().zip(ok) {
            let k = p.args.get(3).copied().unwrap_or(0);
            let s = if ok { status } else { Status::Refused };
            self.reply(p.token, &[s as u64, k, free]);
        }
    }

    fn sync(&mut self, p: Pending) {
        let s = self
            .store
            .sync()
            .err()
            .map_or(Status::Ok, |e| Status::of(&e));
        self.reply(p.token, &[s as u64]);
    }

    /// A run of gets: one store read, each fragment sent into its client's window.
    fn get(&mut self, group: Vec<Pending>) {
        let ids: Vec<FragmentId> = group.iter().map(|p| id_of(&p.args)).collect();
        let results = self.store.read(&ids);
        for ((p, r), id) in group.into_iter().zip(results).zip(ids) {
            let k = p.args.get(3).copied().unwrap_or(0) as usize;
            let Some((w, depth)) = self.clients.get(&client_of(&p)).copied() else {
                self.reply(p.token, &[Status::Refused as u64, k as u64, 0]);
                continue;
            };
            // A ranged get: only `[offset, offset + len)` of the fragment goes back.
            let r = match (p.args.get(4), p.args.get(5)) {
                (Some(&off), Some(&len)) => {
                    r.and_then(|d| fragment_range(&d, id, off as usize, len as usize))
                }
                _ => r,
            };
            match r {
                Ok(d) if k < depth => {
                    let at = (w * self.depth + k) * self.frag;
                    self.ep.segment_mut()[at..at + d.len()].copy_from_slice(&d);
                    let dst = ((depth + k) * self.frag) as u64;
                    let src = [(at, d.len())];
                    let args = [Status::Ok as u64, k as u64, d.len() as u64];
                    let _ = self
                        .ep
                        .ctx()
                        .reply(p.token, AmMsg::bulk(CLIENT_HANDLER, &args, &src, dst));
                    self.served += 1;
                }
                Ok(_) => self.reply(p.token, &[Status::Refused as u64, k as u64, 0]),
                Err(e) => self.reply(p.token, &[Status::of(&e) as u64, k as u64, 0]),
            }
        }
    }

    /// Delete fragments, for a client that holds a window only: one that never said hello,
    /// or whose window a newer generation of it took (a writer fenced by the member that
    /// took its log over), deletes nothing (its cleaner's idea of which segments are dead
    /// is stale).
    fn delete(&mut self, p: Pending) {
        if !self.clients.contains_key(&client_of(&p)) {
            self.bad_requests += 1;
            self.reply(p.token, &[Status::Refused as u64]);
            return;
        }
        let ids: Vec<FragmentId> = decode_ids(&p.payload);
        let s = self
            .store
            .delete(&ids)
            .err()
            .map_or(Status::Ok, |e| Status::of(&e));
        self.reply(p.token, &[s as u64]);
    }

    fn stat(&mut self, p: Pending) {
        match self.store.free_slots() {
            Ok(free) => self.reply(p.token, &[Status::Ok as u64, free as u64, self.frag as u64]),
            Err(e) => self.reply(p.token, &[Status::of(&e) as u64, 0, self.frag as u64]),
        }
    }

    /// One page of the fragment list, after the id the request names (if it names one).
    fn list(&mut self, p: Pending) {
        let after = (p.args.get(3).copied() == Some(1)).then(|| id_of(&p.args));
        let all = match self.store.list() {
            Ok(all) => all,
            Err(e) => {
                self.reply(p.token, &[Status::of(&e) as u64, 0, 0]);
                return;
            }
        };
        let page: Vec<FragmentId> = all
            .iter()
            .filter(|f| after.is_none_or(|a| **f > a))
            .take(LIST_PAGE)
            .copied()
            .collect();
        let more = all.iter().filter(|f| after.is_none_or(|a| **f > a)).count() > page.len();
        let bytes = encode_ids(&page);
        let args = [Status::Ok as u64, page.len() as u64, more as u64];
        let slices = [bytes.as_slice()];
        let _ = self
            .ep
            .ctx()
            .reply(p.token, AmMsg::medium(CLIENT_HANDLER, &args, &slices));
        self.served += 1;
    }
}

/// The fragment a request's arguments name: `[op, segment, index, ..]`.
fn id_of(a: &[u64]) -> FragmentId {
    FragmentId {
        segment: a.get(1).copied().unwrap_or(0),
        index: a.get(2).copied().unwrap_or(0) as u16,
    }
}

/// Who sent a request: the key of its window.
fn client_of(p: &Pending) -> (SocketAddr, u32) {
    let r = p.token.requester();
    (r.addr, r.vnet)
}
