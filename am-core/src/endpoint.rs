//! The endpoint: the engine plus a transport, a handler table, upcalls and a cross-thread
//! handle. It is owned by one event loop (`Send`, not `Sync`).

use crate::api::{GatherResult, Incoming, Msg, MsgId, ReplyToken, RequestId, Undeliverable};
use crate::engine::{Core, Delivery, Event};
use crate::error::{AmError, ErrorCode, TransportError};
use crate::transport::{EventMask, Notify, SegmentMemory, Transport};
use crate::types::{Config, EndpointName, Stats, Tag, MAX_ARGS};
use crate::wire::MsgKind;
use crossbeam_queue::ArrayQueue;
use std::sync::Arc;
use std::time::Duration;

/// A message handler: runs on the endpoint's loop with a context to send from.
pub type Handler = Box<dyn FnMut(&mut Ctx<'_>, Incoming<'_>) + Send>;
/// The asynchronous error upcall.
pub type Upcall = Box<dyn FnMut(&mut Ctx<'_>, Undeliverable) + Send>;
/// Called when a bulk message's source ranges may be reused.
pub type BulkFree = Box<dyn FnMut(MsgId) + Send>;

/// What a handler (or upcall, or gather completion) may do.
pub struct Ctx<'a> {
    core: &'a mut Core,
    in_reply: bool,
}

impl<'a> Ctx<'a> {
    /// This endpoint's name.
    pub fn name(&self) -> EndpointName {
        self.core.name()
    }
    /// True inside a reply handler (which may not send requests).
    pub fn in_reply_handler(&self) -> bool {
        self.in_reply
    }
    /// Sends a one-way message.
    pub fn send(&mut self, index: u16, msg: Msg<'_>) -> Result<MsgId, AmError> {
        self.core.send(index, &msg)
    }
    /// Sends a request; not allowed in a reply handler.
    pub fn request(&mut self, index: u16, msg: Msg<'_>) -> Result<RequestId, AmError> {
        if self.in_reply {
            return Err(AmError::RequestFromReplyHandler);
        }
        self.core.request(index, &msg)
    }
    /// Replies through `token` (consumed, so at most once).
    pub fn reply(&mut self, token: ReplyToken, msg: Msg<'_>) -> Result<MsgId, AmError> {
        self.core.reply(token, &msg)
    }
    /// Passes `token` to the endpoint at `index` with a new request; on a synchronous
    /// error the token comes back.
    pub fn delegate(
        &mut self,
        token: ReplyToken,
        index: u16,
        msg: Msg<'_>,
    ) -> Result<MsgId, (AmError, ReplyToken)> {
        if self.in_reply {
            return Err((AmError::RequestFromReplyHandler, token));
        }
        self.core.delegate(token, index, &msg)
    }
    /// Sends one request per target; `completion` runs once with every result.
    pub fn gather(
        &mut self,
        targets: &[(u16, Msg<'_>)],
        completion: impl FnOnce(&mut Ctx<'_>, Vec<GatherResult>) + Send + 'static,
    ) -> Result<(), AmError> {
        if self.in_reply {
            return Err(AmError::RequestFromReplyHandler);
        }
        self.core.gather(targets, Box::new(completion))
    }
    /// The bulk segment.
    pub fn segment(&self) -> &[u8] {
        &self.core.segment
    }
    /// The bulk segment, writable.
    pub fn segment_mut(&mut self) -> &mut [u8] {
        &mut self.core.segment
    }
    /// Maps `name` with `tag` at `index`.
    pub fn map(&mut self, index: u16, name: EndpointName, tag: Tag) -> Result<(), AmError> {
        self.core.map(index, name, tag)
    }
    /// Counters.
    pub fn stats(&self) -> &Stats {
        self.core.stats()
    }
}

/// A message sent through an [`EndpointHandle`].
struct HandleMsg {
    index: u16,
    handler: u16,
    args: [u64; MAX_ARGS],
    nargs: usize,
    payload: Vec<u8>,
}

/// Lets other threads send through an endpoint: a bounded queue plus the wake-up fd.
#[derive(Clone)]
pub struct EndpointHandle {
    queue: Arc<ArrayQueue<HandleMsg>>,
    notifier: Arc<dyn Notify>,
    max_medium: usize,
}

impl EndpointHandle {
    /// Queues a one-way message (medium if `payload` is non-empty) to the endpoint at
    /// `index` of the owner's translation table, and wakes the owner. `WouldBlock` when
    /// the queue is full. Failures after queueing come back through the owner's upcall.
    pub fn send(
        &self,
        index: u16,
        handler: u16,
        args: &[u64],
        payload: &[u8],
    ) -> Result<(), AmError> {
        if args.len() > MAX_ARGS {
            return Err(AmError::TooManyArgs(args.len()));
        }
        if payload.len() > self.max_medium {
            return Err(AmError::TooLarge {
                len: payload.len(),
                max: self.max_medium,
            });
        }
        let mut a = [0u64; MAX_ARGS];
        a[..args.len()].copy_from_slice(args);
        self.queue
            .push(HandleMsg {
                index,
                handler,
                args: a,
                nargs: args.len(),
                payload: payload.to_vec(),
            })
            .map_err(|_| AmError::WouldBlock)?;
        self.notifier.notify();
        Ok(())
    }
}

/// An Active Messages endpoint over transport `T`.
pub struct Endpoint<T: Transport> {
    // Field order is drop order: the transport (which may have registered the segment with
    // a device) goes before the core that owns the segment.
    transport: T,
    core: Core,
    handlers: Vec<Option<Handler>>,
    upcall: Option<Upcall>,
    bulk_free: Option<BulkFree>,
    handle_queue: Arc<ArrayQueue<HandleMsg>>,
    handle_held: Option<HandleMsg>,
    notifier: Arc<dyn Notify>,
    mask: EventMask,
    failed: Option<TransportError>,
}

impl<T: Transport> Endpoint<T> {
    /// A new endpoint on `transport`.
    pub fn new(transport: T, cfg: Config) -> Endpoint<T> {
        let mut core = Core::new(
            cfg.clone(),
            transport.capabilities(),
            transport.local_addr(),
            transport.seed(),
        );
        core.set_now(transport.now());
        let mut transport = transport;
        // SAFETY: the segment is a Vec the core never resizes, so it does not move; the
        // endpoint drops its transport before its core (field order), so it outlives the
        // transport; the RDMA device writes only ranges a message is being placed in,
        // which the endpoint reads only after the message's handler is called.
        #[allow(unsafe_code)]
        let segment = unsafe { SegmentMemory::new(core.segment.as_mut_ptr(), core.segment.len()) };
        let failed = transport.attach(cfg.tag.0, segment).err();
        let mut handlers = Vec::with_capacity(cfg.handlers);
        handlers.resize_with(cfg.handlers, || None);
        Endpoint {
            core,
            handlers,
            upcall: None,
            bulk_free: None,
            handle_queue: Arc::new(ArrayQueue::new(cfg.handle_queue.max(1))),
            handle_held: None,
            notifier: transport.notifier(),
            transport,
            mask: EventMask::default(),
            failed,
        }
    }

    /// A new endpoint on `transport`, or why the transport could not take the endpoint's
    /// segment (for RDMA: memory registration; raise `ulimit -l`).
    pub fn try_new(transport: T, cfg: Config) -> Result<Endpoint<T>, TransportError> {
        let ep = Endpoint::new(transport, cfg);
        match ep.failed.clone() {
            Some(e) => Err(e),
            None => Ok(ep),
        }
    }

    /// This endpoint's name (address and virtual network).
    pub fn name(&self) -> EndpointName {
        self.core.name()
    }
    /// This endpoint's tag.
    pub fn tag(&self) -> Tag {
        self.core.cfg.tag
    }
    /// Its incarnation number (new for every endpoint created).
    pub fn incarnation(&self) -> u64 {
        self.core.incarnation()
    }
    /// Counters.
    pub fn stats(&self) -> &Stats {
        self.core.stats()
    }
    /// The engine.
    pub fn core(&self) -> &Core {
        &self.core
    }
    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }
    /// The transport, mutably.
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// Installs `handler` at `index` of the handler table.
    pub fn register(
        &mut self,
        index: u16,
        handler: impl FnMut(&mut Ctx<'_>, Incoming<'_>) + Send + 'static,
    ) -> Result<(), AmError> {
        let n = self.handlers.len();
        let slot = self
            .handlers
            .get_mut(index as usize)
            .ok_or(AmError::BadHandler(index, n))?;
        *slot = Some(Box::new(handler));
        self.core.handler_present[index as usize] = true;
        Ok(())
    }

    /// Installs the error upcall.
    pub fn set_upcall(&mut self, f: impl FnMut(&mut Ctx<'_>, Undeliverable) + Send + 'static) {
        self.upcall = Some(Box::new(f));
    }

    /// Installs the bulk-free callback.
    pub fn set_bulk_free(&mut self, f: impl FnMut(MsgId) + Send + 'static) {
        self.bulk_free = Some(Box::new(f));
    }

    /// Chooses which sources wake [`Endpoint::wait`].
    pub fn set_event_mask(&mut self, mask: EventMask) {
        self.mask = mask;
    }

    /// Maps `name` (with its `tag`) at `index` of the translation table.
    pub fn map(&mut self, index: u16, name: EndpointName, tag: Tag) -> Result<(), AmError> {
        self.core.map(index, name, tag)
    }

    /// A context for sending from outside a handler.
    pub fn ctx(&mut self) -> Ctx<'_> {
        self.core.set_now(self.transport.now());
        Ctx {
            core: &mut self.core,
            in_reply: false,
        }
    }

    /// Sends a one-way message to the endpoint at `index`.
    pub fn send(&mut self, index: u16, msg: Msg<'_>) -> Result<MsgId, AmError> {
        self.core.set_now(self.transport.now());
        self.core.send(index, &msg)
    }
    /// Sends a request to the endpoint at `index`. Its deadline counts from now, not from
    /// the last poll.
    pub fn request(&mut self, index: u16, msg: Msg<'_>) -> Result<RequestId, AmError> {
        self.core.set_now(self.transport.now());
        self.core.request(index, &msg)
    }
    /// Sends one request per target; `completion` runs once when all are in.
    pub fn gather(
        &mut self,
        targets: &[(u16, Msg<'_>)],
        completion: impl FnOnce(&mut Ctx<'_>, Vec<GatherResult>) + Send + 'static,
    ) -> Result<(), AmError> {
        self.core.set_now(self.transport.now());
        self.core.gather(targets, Box::new(completion))
    }

    /// The bulk segment.
    pub fn segment(&self) -> &[u8] {
        &self.core.segment
    }
    /// The bulk segment, writable.
    pub fn segment_mut(&mut self) -> &mut [u8] {
        &mut self.core.segment
    }

    /// A handle for other threads.
    pub fn handle(&self) -> EndpointHandle {
        EndpointHandle {
            queue: self.handle_queue.clone(),
            notifier: self.notifier.clone(),
            max_medium: self.core.cfg.max_medium_bytes,
        }
    }

    /// Bytes held in queues and buffers now (see [`Core::memory_bound_per_peer`]).
    pub fn memory_in_use(&self) -> usize {
        self.core.memory_in_use()
    }

    /// True if nothing is queued or unacknowledged.
    pub fn is_idle(&self) -> bool {
        self.core.is_idle() && self.handle_queue.is_empty() && self.handle_held.is_none()
    }

    /// When timers next need [`Endpoint::poll`], relative to now.
    pub fn next_timeout(&self) -> Option<Duration> {
        let now = self.transport.now();
        self.core
            .poll_timeout()
            .map(|t| Duration::from_nanos(t.since_ns(now)))
    }

    /// Runs pending work without blocking: handle sends, up to `budget` datagrams, due
    /// timers, handlers, then transmits. Returns how much work it found.
    pub fn poll(&mut self, budget: usize) -> Result<usize, TransportError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let now = self.transport.now();
        self.core.set_now(now);
        let mut work = self.drain_handle(budget);
        // What the application queued since the last poll leaves before we look for input
        // (a request should not wait behind a receive system call).
        self.transmit()?;
        // Handlers of mediums that arrive whole and in order run while the transport still
        // holds the datagram (an mbuf, a registered buffer): their payload is not copied.
        let (core, handlers, upcall, bulk_free) = (
            &mut self.core,
            &mut self.handlers,
            &mut self.upcall,
            &mut self.bulk_free,
        );
        let mut inline_work = 0;
        work += self.transport.recv_batch(budget, &mut |from, bytes| {
            core.handle_datagram_inline(from, bytes);
            if core.take_inline_queued() {
                inline_work += dispatch(core, handlers, upcall, bulk_free, Some(bytes));
            }
        })?;
        work += inline_work;
        let core = &mut self.core;
        self.transport
            .take_failed(&mut |addr| core.peer_failed(addr));
        // Progress is stamped with the time it is reported, not the start of the poll:
        // sending and receiving may have taken a while (a verbs post on rxe moves the data
        // inside the system call), and a stale stamp would let the next poll's timers give
        // up on a peer that was just seen moving. The timers below still run at `now`.
        self.transport
            .take_progress(&mut |addr, at| core.peer_progressed(addr, at));
        if self.core.poll_timeout().is_some_and(|t| t <= now) {
            self.core.handle_timeout(now);
        }
        work += self.dispatch();
        self.transmit()?;
        Ok(work)
    }

    fn drain_handle(&mut self, budget: usize) -> usize {
        let mut n = 0;
        while n < budget {
            let Some(m) = self.handle_held.take().or_else(|| self.handle_queue.pop()) else {
                break;
            };
            let slices = [&m.payload[..]];
            let msg = if m.payload.is_empty() {
                Msg::small(m.handler, &m.args[..m.nargs])
            } else {
                Msg::medium(m.handler, &m.args[..m.nargs], &slices)
            };
            match self.core.send(m.index, &msg) {
                Ok(_) => n += 1,
                Err(AmError::WouldBlock) => {
                    self.handle_held = Some(m);
                    break;
                }
                Err(_) => {
                    let dest = EndpointName {
                        addr: self.core.name().addr,
                        vnet: self.core.cfg.vnet,
                    };
                    self.core.local_upcall(Undeliverable {
                        code: ErrorCode::NoEndpoint,
                        dest,
                        msg_id: MsgId(0),
                        kind: MsgKind::Oneway,
                        handler: m.handler,
                        args: m.args[..m.nargs].to_vec(),
                        payload: m.payload,
                        bulk: None,
                        request: None,
                        delegated_for: None,
                    });
                    n += 1;
                }
            }
        }
        n
    }

    fn dispatch(&mut self) -> usize {
        dispatch(
            &mut self.core,
            &mut self.handlers,
            &mut self.upcall,
            &mut self.bulk_free,
            None,
        )
    }

    fn transmit(&mut self) -> Result<(), TransportError> {
        // Acknowledgements and data of the whole batch go out together, after the handlers
        // ran (so an acknowledged message has been handled).
        self.core.flush();
        let out = self.core.outbox();
        if out.is_empty() {
            return Ok(());
        }
        let batch = out.make_contiguous();
        match self.transport.send_batch(batch) {
            Ok(n) => {
                self.core.sent(n);
                Ok(())
            }
            Err(e) => {
                // The datagrams are lost; retransmission (or the upcall) covers them.
                out.clear();
                Err(e)
            }
        }
    }

    /// Sleeps until a datagram, a handle send or a timer is due, or `timeout` passes.
    /// Returns at once if work is pending.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<(), TransportError> {
        if !self.core.outbox().is_empty() || !self.handle_queue.is_empty() {
            return Ok(());
        }
        let t = match (timeout, self.next_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if t == Some(Duration::ZERO) {
            return Ok(());
        }
        self.transport.wait(t, self.mask)
    }

    /// Marks the endpoint closed: sends fail with `Closed`; pending work still drains.
    pub fn close(&mut self) {
        self.core.close();
    }
}

/// Runs the queued events: handlers, upcalls, gather completions, bulk-free callbacks.
/// `current` is the datagram being received, where inline payloads lie.
fn dispatch(
    core: &mut Core,
    handlers: &mut [Option<Handler>],
    upcall: &mut Option<Upcall>,
    bulk_free: &mut Option<BulkFree>,
    current: Option<&[u8]>,
) -> usize {
    let mut n = 0;
    while let Some(ev) = core.next_event() {
        n += 1;
        match ev {
            Event::Deliver(mut d) => deliver(core, handlers, &mut d, current),
            Event::Upcall(u) => {
                if let Some(mut f) = upcall.take() {
                    f(
                        &mut Ctx {
                            core,
                            in_reply: false,
                        },
                        u,
                    );
                    if upcall.is_none() {
                        *upcall = Some(f);
                    }
                }
            }
            Event::GatherDone(f, results) => f(
                &mut Ctx {
                    core,
                    in_reply: false,
                },
                results,
            ),
            Event::BulkFree(id) => {
                if let Some(f) = bulk_free.as_mut() {
                    f(id);
                }
            }
        }
    }
    n
}

/// Runs the handler of a delivered message (none if its slot is empty). The handler is
/// taken out of its slot while it runs and put back unless the slot was filled meanwhile.
#[inline]
fn deliver(
    core: &mut Core,
    handlers: &mut [Option<Handler>],
    d: &mut Delivery,
    current: Option<&[u8]>,
) {
    let idx = d.handler as usize;
    let Some(mut h) = handlers.get_mut(idx).and_then(Option::take) else {
        return;
    };
    // An inline payload lies in the datagram being received.
    let payload: &[u8] = match d.inline {
        Some((off, len)) => {
            debug_assert!(current.is_some(), "inline delivery outside receive");
            current.and_then(|b| b.get(off..off + len)).unwrap_or(&[])
        }
        None => &d.payload,
    };
    let mut ctx = Ctx {
        core,
        in_reply: d.kind == MsgKind::Reply,
    };
    let source = EndpointName {
        addr: d.from,
        vnet: ctx.core.cfg.vnet,
    };
    h(
        &mut ctx,
        Incoming {
            source,
            kind: d.kind,
            handler: d.handler,
            args: &d.args[..d.nargs],
            payload,
            bulk: d.bulk,
            token: d.token.take(),
            request: d.request,
        },
    );
    if let Some(slot) = handlers.get_mut(idx) {
        if slot.is_none() {
            *slot = Some(h);
        }
    }
}
