//! Fragments over Active Messages: a storage server serving its [`FragmentStore`] to
//! clients' logs ([`StorageServer`]), and the client side, itself a [`FragmentStore`]
//! ([`RemoteStore`]), so a [`crate::storage::log::Log`] stripes over remote servers the
//! same way as over local stores.
//!
//! Fragment data travels as AM **bulk** messages, straight into a *window* of the other
//! side's segment: at `hello` the server gives each client a window of `depth` fragment
//! slots in its segment; the client keeps at most `depth` requests outstanding, request k
//! using slot k of its window (a put lands there; a get's data leaves from there) and slot
//! k of the client's own read area (where the get's bulk reply lands). The server batches
//! the puts (and gets) it received in one poll into one store call, so a client with
//! `depth` puts outstanding gets `depth` writes in flight on the server's device.
//!
//! Requests: `[op, ...]` to [`SERVER_HANDLER`]; replies `[status, ...]` to
//! [`CLIENT_HANDLER`], status 0 for success, else a [`StoreError`] kind. A server that does
//! not answer makes the client's call fail with [`StoreError::Io`] naming it.

use crate::lock;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use am_core::{
    AmError, Endpoint, EndpointName, Msg as AmMsg, ReplyToken, Tag, Transport, TransportError,
};

use super::fragment::{check_sizes, FragmentId, FragmentStore, StoreError};

/// Handler index of storage requests on the server.
pub const SERVER_HANDLER: u16 = 2;
/// Handler index of storage replies on the client.
pub const CLIENT_HANDLER: u16 = 3;

const HELLO: u64 = 1;
const PUT: u64 = 2;
const SYNC: u64 = 3;
const GET: u64 = 4;
const DELETE: u64 = 5;
const STAT: u64 = 6;
const LIST: u64 = 7;
const LIST_PAGE: usize = 500;
const ID_BYTES: usize = 10;

fn encode_ids(ids: &[FragmentId]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(ids.len() * ID_BYTES);
    for f in ids {
        bytes.extend_from_slice(&f.segment.to_le_bytes());
        bytes.extend_from_slice(&f.index.to_le_bytes());
    }
    bytes
}

fn decode_ids(bytes: &[u8]) -> Vec<FragmentId> {
    bytes
        .chunks_exact(ID_BYTES)
        .map(|c| FragmentId {
            segment: u64::from_le_bytes(c[..8].try_into().unwrap_or([0; 8])),
            index: u16::from_le_bytes([c[8], c[9]]),
        })
        .collect()
}

fn status_of(e: &StoreError) -> u64 {
    match e {
        StoreError::NoSpace { .. } => 1,
        StoreError::TooLarge { .. } => 2,
        StoreError::NotFound(_) => 3,
        StoreError::Corrupt { .. } => 4,
        StoreError::Io { .. } => 5,
        StoreError::Config(_) => 6,
    }
}

fn error_of(status: u64, id: FragmentId, server: &str) -> StoreError {
    match status {
        1 => StoreError::NoSpace { free: 0, needed: 1 },
        2 => StoreError::TooLarge { len: 0, max: 0 },
        3 => StoreError::NotFound(id),
        4 => StoreError::Corrupt {
            id,
            why: "checksum mismatch on the storage server",
        },
        5 => StoreError::Io {
            path: server.to_string(),
            source: std::io::Error::other("device error on the storage server"),
        },
        _ => StoreError::Config(format!("storage server {server} refused the request")),
    }
}

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
            let op = first.args.first().copied().unwrap_or(0);
            let mut group = vec![first];
            if op == PUT || op == GET {
                while batch.front().is_some_and(|p| p.args.first() == Some(&op)) {
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

    fn serve(&mut self, op: u64, group: Vec<Pending>) {
        let id_of = |a: &[u64]| FragmentId {
            segment: a.get(1).copied().unwrap_or(0),
            index: a.get(2).copied().unwrap_or(0) as u16,
        };
        let client = |p: &Pending| {
            let r = p.token.requester();
            (r.addr, r.vnet)
        };
        match op {
            HELLO => {
                for p in group {
                    let key = client(&p);
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
                            self.reply(p.token, &[0, base, self.frag as u64, self.depth as u64]);
                        }
                        _ => self.reply(p.token, &[6, 0, self.frag as u64, self.depth as u64]),
                    }
                }
            }
            PUT => {
                // A put must land in its sender's own window (the segment is shared by every
                // client: one that writes elsewhere is refused, counted as a bad request).
                let window = self.depth * self.frag;
                let in_window =
                    |p: &Pending, clients: &BTreeMap<(SocketAddr, u32), (usize, usize)>| {
                        let r = p.token.requester();
                        match (clients.get(&(r.addr, r.vnet)), p.landed) {
                            (Some((w, _)), Some((off, len))) => {
                                let start = (*w * window) as u64;
                                off >= start && off + len as u64 <= start + window as u64
                            }
                            _ => false,
                        }
                    };
                let ok: Vec<bool> = group.iter().map(|p| in_window(p, &self.clients)).collect();
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
                        Ok(()) => 0,
                        Err(e) => status_of(&e),
                    }
                };
                for (p, ok) in group.into_iter().zip(ok) {
                    let k = p.args.get(3).copied().unwrap_or(0);
                    let s = if ok { status } else { 6 };
                    self.reply(p.token, &[s, k]);
                }
            }
            SYNC => {
                for p in group {
                    let s = self.store.sync().err().map_or(0, |e| status_of(&e));
                    self.reply(p.token, &[s]);
                }
            }
            GET => {
                let ids: Vec<FragmentId> = group.iter().map(|p| id_of(&p.args)).collect();
                let results = self.store.read(&ids);
                for (p, r) in group.into_iter().zip(results) {
                    let k = p.args.get(3).copied().unwrap_or(0) as usize;
                    let Some((w, depth)) = self.clients.get(&client(&p)).copied() else {
                        self.reply(p.token, &[6, k as u64, 0]);
                        continue;
                    };
                    match r {
                        Ok(d) if k < depth => {
                            let at = (w * self.depth + k) * self.frag;
                            self.ep.segment_mut()[at..at + d.len()].copy_from_slice(&d);
                            let dst = ((depth + k) * self.frag) as u64;
                            let src = [(at, d.len())];
                            let args = [0, k as u64, d.len() as u64];
                            let _ = self
                                .ep
                                .ctx()
                                .reply(p.token, AmMsg::bulk(CLIENT_HANDLER, &args, &src, dst));
                            self.served += 1;
                        }
                        Ok(_) => self.reply(p.token, &[6, k as u64, 0]),
                        Err(e) => self.reply(p.token, &[status_of(&e), k as u64, 0]),
                    }
                }
            }
            DELETE => {
                for p in group {
                    let ids: Vec<FragmentId> = decode_ids(&p.payload);
                    let s = self.store.delete(&ids).err().map_or(0, |e| status_of(&e));
                    self.reply(p.token, &[s]);
                }
            }
            STAT => {
                for p in group {
                    match self.store.free_slots() {
                        Ok(free) => self.reply(p.token, &[0, free as u64, self.frag as u64]),
                        Err(e) => self.reply(p.token, &[status_of(&e), 0, self.frag as u64]),
                    }
                }
            }
            LIST => {
                for p in group {
                    let after = (p.args.get(3).copied() == Some(1)).then(|| id_of(&p.args));
                    let all = match self.store.list() {
                        Ok(all) => all,
                        Err(e) => {
                            self.reply(p.token, &[status_of(&e), 0, 0]);
                            continue;
                        }
                    };
                    let page: Vec<FragmentId> = all
                        .iter()
                        .filter(|f| after.is_none_or(|a| **f > a))
                        .take(LIST_PAGE)
                        .copied()
                        .collect();
                    let more =
                        all.iter().filter(|f| after.is_none_or(|a| **f > a)).count() > page.len();
                    let bytes = encode_ids(&page);
                    let args = [0, page.len() as u64, more as u64];
                    let slices = [bytes.as_slice()];
                    let _ = self
                        .ep
                        .ctx()
                        .reply(p.token, AmMsg::medium(CLIENT_HANDLER, &args, &slices));
                    self.served += 1;
                }
            }
            _ => {
                for p in group {
                    self.reply(p.token, &[6]);
                }
            }
        }
    }
}

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
}

impl<T: Transport> RemoteStore<T> {
    /// Connect to the server `name`/`tag` over `ep` (whose segment must hold `2 * depth`
    /// fragments), with up to `depth` requests outstanding. `pump` runs while waiting
    /// (a no-op over a real network, where the server runs on its own).
    pub fn connect(
        mut ep: Endpoint<T>,
        name: EndpointName,
        tag: Tag,
        depth: usize,
        pump: Box<dyn FnMut() + Send>,
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
        };
        let r = s.call(
            &[HELLO, depth as u64],
            FragmentId {
                segment: 0,
                index: 0,
            },
        )?;
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
        let deadline = Instant::now() + self.timeout;
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
                if Instant::now() > deadline {
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
        self.send(AmMsg::small(SERVER_HANDLER, args))?;
        let r = self.next_reply()?;
        match r.args.first() {
            Some(0) => Ok(r),
            Some(s) if args[0] != HELLO => Err(error_of(*s, id, &self.server)),
            _ => Ok(r),
        }
    }
}

impl<T: Transport> FragmentStore for RemoteStore<T> {
    fn fragment_bytes(&self) -> usize {
        self.frag
    }

    fn free_slots(&mut self) -> Result<usize, StoreError> {
        let r = self.call(
            &[STAT],
            FragmentId {
                segment: 0,
                index: 0,
            },
        )?;
        Ok(r.args.get(1).copied().unwrap_or(0) as usize)
    }

    fn write(&mut self, fragments: &[(FragmentId, &[u8])]) -> Result<(), StoreError> {
        check_sizes(fragments, self.frag)?;
        // All or nothing on space, as the trait says (checked first; another client may
        // still take the room in between, then some fragments of the batch are written).
        let free = self.free_slots()?;
        if free < fragments.len() {
            return Err(StoreError::NoSpace {
                free,
                needed: fragments.len(),
            });
        }
        let mut free_k: Vec<usize> = (0..self.depth).rev().collect();
        let (mut next, mut outstanding) = (0, 0);
        let mut first_err: Option<StoreError> = None;
        while next < fragments.len() || outstanding > 0 {
            while next < fragments.len() && first_err.is_none() {
                let Some(k) = free_k.pop() else { break };
                let (id, data) = fragments[next];
                let at = k * self.frag;
                self.ep.segment_mut()[at..at + data.len()].copy_from_slice(data);
                let args = [PUT, id.segment, id.index as u64, k as u64];
                let src = [(at, data.len())];
                let dst = self.base + at as u64;
                self.send(AmMsg::bulk(SERVER_HANDLER, &args, &src, dst))?;
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
            if r.args.first() != Some(&0) && first_err.is_none() {
                let id = fragments.get(next.saturating_sub(1)).map_or(
                    FragmentId {
                        segment: 0,
                        index: 0,
                    },
                    |f| f.0,
                );
                first_err = Some(error_of(r.args[0], id, &self.server));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        self.call(
            &[SYNC],
            FragmentId {
                segment: 0,
                index: 0,
            },
        )
        .map(|_| ())
    }

    fn read(&mut self, ids: &[FragmentId]) -> Vec<Result<Vec<u8>, StoreError>> {
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
                    &[GET, id.segment, id.index as u64, k as u64],
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
                        Some(s) => Err(error_of(*s, ids[i], &self.server)),
                        None => Err(error_of(6, ids[i], &self.server)),
                    });
                }
                Err(_) => break,
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(self.unreachable())))
            .collect()
    }

    fn delete(&mut self, ids: &[FragmentId]) -> Result<(), StoreError> {
        for chunk in ids.chunks(LIST_PAGE) {
            let bytes = encode_ids(chunk);
            let slices = [bytes.as_slice()];
            self.send(AmMsg::medium(SERVER_HANDLER, &[DELETE], &slices))?;
            let r = self.next_reply()?;
            if r.args.first() != Some(&0) {
                return Err(error_of(r.args[0], chunk[0], &self.server));
            }
        }
        Ok(())
    }

    fn list(&mut self) -> Result<Vec<FragmentId>, StoreError> {
        let mut all = Vec::new();
        let mut after: Option<FragmentId> = None;
        loop {
            let args = match after {
                Some(a) => [LIST, a.segment, a.index as u64, 1],
                None => [LIST, 0, 0, 0],
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
