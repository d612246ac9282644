//! The transport conformance suite: behaviour every transport must show (sim, UDP, verbs).
//!
//! A transport plugs in through a [`Harness`] that makes endpoints, kills them, and runs
//! them until a condition holds. [`run_suite`] runs every check and returns the first
//! failure with a description; each check asserts exact outcomes (exactly once, in order,
//! byte-exact, within a time bound).
//!
//! Set-up steps that cannot fail on a correct harness (`register`, `map`, a poisoned log
//! mutex) `unwrap`; behaviour is reported as `Err`, never by panicking.

use am_core::api::{GatherResult, Msg, MsgId, Undeliverable};
use am_core::endpoint::Endpoint;
use am_core::error::{AmError, ErrorCode};
use am_core::transport::Transport;
use am_core::types::{Config, EndpointName, Tag, Time};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the suite makes and drives endpoints of one transport.
pub trait Harness {
    /// The transport under test.
    type T: Transport;
    /// The configuration every endpoint starts from (tests adjust vnet, tag, ...).
    fn base_config(&self) -> Config;
    /// A new endpoint at a fresh address.
    fn endpoint(&mut self, cfg: Config) -> Endpoint<Self::T>;
    /// A new endpoint at `addr`, where a killed one was (a restart: new incarnation).
    fn endpoint_at(&mut self, addr: SocketAddr, cfg: Config) -> Endpoint<Self::T>;
    /// Kills an endpoint: its address stops answering.
    fn kill(&mut self, ep: Endpoint<Self::T>);
    /// Polls `eps` until `done()` holds or `limit` passes; returns whether it held.
    fn run(
        &mut self,
        eps: &mut [&mut Endpoint<Self::T>],
        limit: Duration,
        done: &mut dyn FnMut() -> bool,
    ) -> bool;
    /// The current time as the endpoints see it.
    fn now(&self) -> Time;
    /// The bulk size to move in the classes check.
    fn bulk_bytes(&self) -> usize;
    /// Messages to send in the ordering check.
    fn stream_len(&self) -> usize {
        200
    }
}

/// Polls `eps` until `done()` holds or `limit` passes, running `pump` (another source of
/// work, such as a test switch moving frames; `&mut || 0` for none) before each round and
/// sleeping `idle` after a round that found no work; returns whether `done()` held. The
/// body of most harnesses' [`Harness::run`].
pub fn poll_until<T: Transport>(
    eps: &mut [&mut Endpoint<T>],
    limit: Duration,
    done: &mut dyn FnMut() -> bool,
    pump: &mut dyn FnMut() -> usize,
    idle: Duration,
) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let mut work = pump();
        for ep in eps.iter_mut() {
            work += ep.poll(256).unwrap_or(0);
        }
        if done() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        if work == 0 {
            std::thread::sleep(idle);
        }
    }
}

/// A check's failure, with what was expected.
pub type CheckResult = Result<(), String>;

type Log<T> = Arc<Mutex<Vec<T>>>;

fn log<T>() -> Log<T> {
    Arc::new(Mutex::new(Vec::new()))
}

fn len<T>(l: &Log<T>) -> usize {
    l.lock().map(|v| v.len()).unwrap_or(0)
}

fn take<T: Clone>(l: &Log<T>) -> Vec<T> {
    l.lock().map(|v| v.clone()).unwrap_or_default()
}

fn ensure(cond: bool, what: impl FnOnce() -> String) -> CheckResult {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

/// Slack on top of the configured unreachable bound for "within the bound" checks.
const SLACK: Duration = Duration::from_millis(1500);

/// Makes `a` and `b` know each other at index 0 (a -> b) and index 0 (b -> a).
fn pair<H: Harness>(h: &mut H) -> (Endpoint<H::T>, Endpoint<H::T>) {
    let mut ca = h.base_config();
    ca.tag = Tag(0xa11ce);
    let mut cb = h.base_config();
    cb.tag = Tag(0xb0b);
    let mut a = h.endpoint(ca);
    let mut b = h.endpoint(cb);
    let (na, ta, nb, tb) = (a.name(), a.tag(), b.name(), b.tag());
    a.map(0, nb, tb).expect("map");
    b.map(0, na, ta).expect("map");
    (a, b)
}

/// Sends `f(i)` for i in 0..n from `eps[0]`, running all endpoints while the queue is full.
fn send_all<H: Harness>(
    h: &mut H,
    eps: &mut [&mut Endpoint<H::T>],
    n: usize,
    mut f: impl FnMut(&mut Endpoint<H::T>, usize) -> Result<MsgId, AmError>,
) -> CheckResult {
    let mut i = 0;
    while i < n {
        match f(eps[0], i) {
            Ok(_) => i += 1,
            Err(AmError::WouldBlock) => {
                h.run(eps, Duration::from_millis(5), &mut || false);
            }
            Err(e) => return Err(format!("send {i} failed: {e}")),
        }
    }
    Ok(())
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) >> 3) as u8)
        .collect()
}

/// `len` pseudo-random bytes from `seed` (xorshift): test data in which a misplaced or
/// repeated chunk shows.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Small (0 and 8 args), medium (1 B to the bound, scatter/gather, fragmented) and bulk
/// (byte-exact in the segment, handler after all bytes, sender told when free).
pub fn check_classes<H: Harness>(h: &mut H) -> CheckResult {
    let (mut a, mut b) = pair(h);
    let smalls: Log<Vec<u64>> = log();
    let mediums: Log<Vec<u8>> = log();
    let bulks: Log<(u64, usize, Vec<u8>)> = log();
    let s = smalls.clone();
    b.register(1, move |_, m| s.lock().unwrap().push(m.args.to_vec()))
        .unwrap();
    let md = mediums.clone();
    b.register(2, move |_, m| md.lock().unwrap().push(m.payload.to_vec()))
        .unwrap();
    let bk = bulks.clone();
    b.register(3, move |ctx, m| {
        let (off, len) = m.bulk.unwrap_or((0, 0));
        let bytes = ctx.segment()[off as usize..off as usize + len].to_vec();
        bk.lock().unwrap().push((off, len, bytes));
    })
    .unwrap();
    let freed: Log<MsgId> = log();
    let fr = freed.clone();
    a.set_bulk_free(move |id| fr.lock().unwrap().push(id));

    let eight: Vec<u64> = (1..=8).map(|i| i * 0x0101_0101_0101).collect();
    a.send(0, Msg::small(1, &[])).map_err(|e| e.to_string())?;
    a.send(0, Msg::small(1, &eight))
        .map_err(|e| e.to_string())?;
    let max = a.core().config().max_medium_bytes;
    let big = pattern(1, max);
    let (p1, rest) = big.split_at(100);
    let (p2, p3) = rest.split_at(3000.min(rest.len()));
    a.send(0, Msg::medium(2, &[7], &[&[0x5a]]))
        .map_err(|e| e.to_string())?;
    a.send(0, Msg::medium(2, &[8], &[p1, p2, p3]))
        .map_err(|e| e.to_string())?;
    ensure(
        matches!(
            a.send(0, Msg::medium(2, &[], &[&big, &[1]])),
            Err(AmError::TooLarge { .. })
        ),
        || "a medium above the bound must be refused with TooLarge".into(),
    )?;
    let nbulk = h
        .bulk_bytes()
        .min(a.segment().len() / 2)
        .min(b.segment().len() / 2);
    let data = pattern(2, nbulk);
    let half = nbulk / 2;
    // Two source ranges (scatter/gather), not contiguous in the source segment.
    a.segment_mut()[..half].copy_from_slice(&data[..half]);
    a.segment_mut()[half + 64..nbulk + 64].copy_from_slice(&data[half..]);
    let dst = 4096u64;
    let bulk_id = a
        .send(
            0,
            Msg::bulk(3, &[9], &[(0, half), (half + 64, nbulk - half)], dst),
        )
        .map_err(|e| e.to_string())?;
    let limit = Duration::from_secs(30);
    let ok = h.run(&mut [&mut a, &mut b], limit, &mut || {
        len(&smalls) >= 2 && len(&mediums) >= 2 && len(&bulks) >= 1 && len(&freed) >= 1
    });
    ensure(ok, || {
        format!(
            "classes did not all arrive: smalls {} mediums {} bulks {} freed {}",
            len(&smalls),
            len(&mediums),
            len(&bulks),
            len(&freed)
        )
    })?;
    let s = take(&smalls);
    ensure(s == vec![vec![], eight.clone()], || {
        format!("small args wrong: {s:?}")
    })?;
    let m = take(&mediums);
    ensure(m.len() == 2 && m[0] == vec![0x5a] && m[1] == big, || {
        format!(
            "medium payloads wrong (lens {:?})",
            m.iter().map(Vec::len).collect::<Vec<_>>()
        )
    })?;
    let bl = take(&bulks);
    ensure(
        bl.len() == 1 && bl[0].0 == dst && bl[0].1 == nbulk && bl[0].2 == data,
        || {
            format!(
                "bulk wrong: {:?}",
                bl.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>()
            )
        },
    )?;
    let f = take(&freed);
    ensure(f == vec![bulk_id], || {
        format!("bulk-free callbacks {f:?}, expected [{bulk_id:?}]")
    })?;
    Ok(())
}

/// A stream of small and fragmented medium messages arrives exactly once and in order.
pub fn check_order<H: Harness>(h: &mut H) -> CheckResult {
    let (mut a, mut b) = pair(h);
    let got: Log<(u64, usize, bool)> = log();
    let g = got.clone();
    b.register(1, move |_, m| {
        let i = m.args.first().copied().unwrap_or(u64::MAX);
        let ok = m.payload == pattern(i, m.payload.len()).as_slice();
        g.lock().unwrap().push((i, m.payload.len(), ok));
    })
    .unwrap();
    let n = h.stream_len();
    let lens: Vec<usize> = (0..n).map(|i| [0, 17, 1500, 4000, 8192][i % 5]).collect();
    let bodies: Vec<Vec<u8>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| pattern(i as u64, l))
        .collect();
    send_all(h, &mut [&mut a, &mut b], n, |a, i| {
        if lens[i] == 0 {
            a.send(0, Msg::small(1, &[i as u64]))
        } else {
            a.send(0, Msg::medium(1, &[i as u64], &[&bodies[i]]))
        }
    })?;
    let ok = h.run(&mut [&mut a, &mut b], Duration::from_secs(60), &mut || {
        len(&got) >= n
    });
    // Let duplicates, if any, show up.
    h.run(
        &mut [&mut a, &mut b],
        Duration::from_millis(50),
        &mut || false,
    );
    let v = take(&got);
    ensure(ok, || {
        format!(
            "only {} of {n} messages arrived; sender {:?}; receiver {:?}",
            v.len(),
            a.stats(),
            b.stats()
        )
    })?;
    ensure(v.len() == n, || {
        format!("{} deliveries for {n} messages (duplicates)", v.len())
    })?;
    for (k, (i, l, good)) in v.iter().enumerate() {
        ensure(*i == k as u64 && *l == lens[k] && *good, || {
            format!(
                "delivery {k} was message {i} (len {l}, intact {good}): out of order or corrupt"
            )
        })?;
    }
    Ok(())
}

/// Request and reply; a reply handler cannot send requests; exactly one reply.
pub fn check_request_reply<H: Harness>(h: &mut H) -> CheckResult {
    let (mut a, mut b) = pair(h);
    b.register(1, |ctx, mut m| {
        let x = m.args[0];
        if let Some(t) = m.token.take() {
            let body = x.to_le_bytes();
            let _ = ctx.reply(t, Msg::medium(2, &[x + 1], &[&body]));
        }
    })
    .unwrap();
    let replies: Log<(u64, Vec<u8>, bool, bool)> = log();
    let r = replies.clone();
    a.register(2, move |ctx, m| {
        let refused = matches!(
            ctx.request(0, Msg::small(1, &[0])),
            Err(AmError::RequestFromReplyHandler)
        );
        r.lock()
            .unwrap()
            .push((m.args[0], m.payload.to_vec(), refused, m.request.is_some()));
    })
    .unwrap();
    let ids: Vec<_> = (0..5u64)
        .map(|x| a.request(0, Msg::small(1, &[x * 10])))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let ok = h.run(&mut [&mut a, &mut b], Duration::from_secs(30), &mut || {
        len(&replies) >= 5
    });
    h.run(
        &mut [&mut a, &mut b],
        Duration::from_millis(50),
        &mut || false,
    );
    let v = take(&replies);
    ensure(ok && v.len() == 5, || {
        format!(
            "{} replies for 5 requests; requester {:?}; replier {:?}",
            v.len(),
            a.stats(),
            b.stats()
        )
    })?;
    for (k, (x, body, refused, has_req)) in v.iter().enumerate() {
        let want = k as u64 * 10;
        ensure(
            *x == want + 1 && body == &want.to_le_bytes() && *has_req,
            || format!("reply {k} wrong: {x} {body:?}"),
        )?;
        ensure(*refused, || {
            "a reply handler was allowed to send a request".into()
        })?;
    }
    ensure(b.stats().replies_sent == 5, || {
        format!("replier sent {} replies", b.stats().replies_sent)
    })?;
    ensure(a.core().outstanding_requests() == 0, || {
        "requests left outstanding".into()
    })?;
    let _ = ids;
    Ok(())
}

/// A asks M; M delegates to B; B replies straight to A.
pub fn check_delegation<H: Harness>(h: &mut H) -> CheckResult {
    let mut cfg = h.base_config();
    cfg.tag = Tag(0xaaaa);
    let mut a = h.endpoint(cfg.clone());
    cfg.tag = Tag(0x3333);
    let mut m = h.endpoint(cfg.clone());
    cfg.tag = Tag(0xbbbb);
    let mut b = h.endpoint(cfg);
    let (na, nm, nb) = (a.name(), m.name(), b.name());
    a.map(0, nm, m.tag()).unwrap();
    m.map(0, nb, b.tag()).unwrap();
    // B does not know A: the token is all it needs.
    m.register(1, |ctx, mut msg| {
        if let Some(t) = msg.token.take() {
            let block = msg.args[0];
            if let Err((_, t)) = ctx.delegate(t, 0, Msg::small(1, &[block])) {
                // Shows up as a wrong reply source at A.
                let _ = ctx.reply(t, Msg::small(2, &[u64::MAX]));
            }
        }
    })
    .unwrap();
    b.register(1, |ctx, mut msg| {
        if let Some(t) = msg.token.take() {
            let data = pattern(msg.args[0], 3000);
            let _ = ctx.reply(t, Msg::medium(2, &[msg.args[0]], &[&data]));
        }
    })
    .unwrap();
    let got: Log<(EndpointName, u64, Vec<u8>)> = log();
    let g = got.clone();
    a.register(2, move |_, msg| {
        g.lock()
            .unwrap()
            .push((msg.source, msg.args[0], msg.payload.to_vec()))
    })
    .unwrap();
    a.request(0, Msg::small(1, &[42]))
        .map_err(|e| e.to_string())?;
    let ok = h.run(
        &mut [&mut a, &mut m, &mut b],
        Duration::from_secs(30),
        &mut || len(&got) >= 1,
    );
    h.run(
        &mut [&mut a, &mut m, &mut b],
        Duration::from_millis(50),
        &mut || false,
    );
    let v = take(&got);
    ensure(ok && v.len() == 1, || {
        format!("{} replies at A, expected exactly 1", v.len())
    })?;
    ensure(v[0].0 == nb, || {
        format!("reply came from {}, expected B {nb} (not M {nm})", v[0].0)
    })?;
    ensure(v[0].1 == 42 && v[0].2 == pattern(42, 3000), || {
        "reply data wrong".into()
    })?;
    ensure(m.stats().replies_sent == 0, || {
        format!("M sent {} replies", m.stats().replies_sent)
    })?;
    ensure(m.stats().delegations == 1, || {
        "M did not count its delegation".into()
    })?;
    ensure(b.stats().replies_sent == 1, || {
        "B did not reply exactly once".into()
    })?;
    ensure(a.core().outstanding_requests() == 0, || {
        "A's request still outstanding".into()
    })?;
    let _ = na;
    Ok(())
}

/// Gather from 3 endpoints completes once with 3 replies; with one dead, with 2 replies
/// and 1 `Unreachable`, within the bound.
pub fn check_gather<H: Harness>(h: &mut H) -> CheckResult {
    let mut cfg = h.base_config();
    cfg.tag = Tag(1);
    let mut a = h.endpoint(cfg.clone());
    let mut servers = Vec::new();
    for i in 0..3u64 {
        cfg.tag = Tag(100 + i);
        let mut s = h.endpoint(cfg.clone());
        s.register(1, move |ctx, mut m| {
            if let Some(t) = m.token.take() {
                let frag = pattern(i, 2000);
                let _ = ctx.reply(t, Msg::medium(0, &[i, m.args[0]], &[&frag]));
            }
        })
        .unwrap();
        a.map(i as u16, s.name(), s.tag()).unwrap();
        servers.push(s);
    }
    let names: Vec<EndpointName> = servers.iter().map(|s| s.name()).collect();
    let done: Log<Vec<GatherResult>> = log();
    let d = done.clone();
    let targets: Vec<(u16, Msg<'_>)> = (0..3u16).map(|i| (i, Msg::small(1, &[77]))).collect();
    a.gather(&targets, move |_, r| d.lock().unwrap().push(r))
        .map_err(|e| e.to_string())?;
    {
        let [s0, s1, s2] = &mut servers[..] else {
            unreachable!()
        };
        let ok = h.run(
            &mut [&mut a, s0, s1, s2],
            Duration::from_secs(30),
            &mut || len(&done) >= 1,
        );
        h.run(
            &mut [&mut a, s0, s1, s2],
            Duration::from_millis(50),
            &mut || false,
        );
        ensure(ok, || "gather did not complete".into())?;
    }
    let v = take(&done);
    ensure(v.len() == 1, || {
        format!("gather completed {} times", v.len())
    })?;
    for (i, r) in v[0].iter().enumerate() {
        match r {
            Ok(rep) => ensure(
                rep.source == names[i]
                    && rep.args == vec![i as u64, 77]
                    && rep.payload == pattern(i as u64, 2000),
                || format!("gather member {i} wrong: {:?} {:?}", rep.source, rep.args),
            )?,
            Err(e) => return Err(format!("gather member {i} failed: {e}")),
        }
    }
    // Now with the third server dead.
    let dead = servers.pop().expect("3 servers");
    h.kill(dead);
    let done2: Log<Vec<GatherResult>> = log();
    let d = done2.clone();
    let start = h.now();
    a.gather(&targets, move |_, r| d.lock().unwrap().push(r))
        .map_err(|e| e.to_string())?;
    let bound = a.core().config().unreachable_timeout + SLACK;
    let [s0, s1] = &mut servers[..] else {
        unreachable!()
    };
    let ok = h.run(&mut [&mut a, s0, s1], bound + SLACK, &mut || {
        len(&done2) >= 1
    });
    let elapsed = Duration::from_nanos(h.now().since_ns(start));
    h.run(
        &mut [&mut a, s0, s1],
        Duration::from_millis(50),
        &mut || false,
    );
    let v = take(&done2);
    ensure(ok && v.len() == 1, || {
        format!("gather with a dead member completed {} times", v.len())
    })?;
    ensure(elapsed <= bound, || {
        format!("gather with a dead member took {elapsed:?} > {bound:?}")
    })?;
    let oks = v[0].iter().filter(|r| r.is_ok()).count();
    ensure(oks == 2 && v[0][2] == Err(ErrorCode::Unreachable), || {
        format!(
            "expected 2 replies and Unreachable, got {:?}",
            v[0].iter()
                .map(|r| r.as_ref().map(|_| ()))
                .collect::<Vec<_>>()
        )
    })?;
    Ok(())
}

/// Wrong tag -> `BadTag` upcall and no handler run; missing handler -> `NoHandler`;
/// another virtual network -> refused by `map`, and `NoEndpoint` if named falsely.
pub fn check_tags_and_vnets<H: Harness>(h: &mut H) -> CheckResult {
    let (mut a, mut b) = pair(h);
    let ran: Log<u64> = log();
    let r = ran.clone();
    b.register(1, move |_, m| r.lock().unwrap().push(m.args[0]))
        .unwrap();
    let ups: Log<Undeliverable> = log();
    let u = ups.clone();
    a.set_upcall(move |_, x| u.lock().unwrap().push(x));
    a.map(1, b.name(), Tag(b.tag().0 ^ 1)).unwrap();
    let body = pattern(5, 700);
    let bad_id = a
        .send(1, Msg::medium(1, &[5], &[&body]))
        .map_err(|e| e.to_string())?;
    let nh_id = a.send(0, Msg::small(9, &[6])).map_err(|e| e.to_string())?;
    let mut other = h.base_config();
    other.vnet = 1;
    other.tag = Tag(77);
    let mut c = h.endpoint(other);
    c.register(1, |_, _| {}).unwrap();
    let err = a.map(2, c.name(), c.tag());
    ensure(
        matches!(err, Err(AmError::OtherVirtualNetwork { .. })),
        || format!("mapping an endpoint of another vnet gave {err:?}"),
    )?;
    let lie = EndpointName {
        addr: c.name().addr,
        vnet: a.name().vnet,
    };
    a.map(2, lie, c.tag()).unwrap();
    let vn_id = a.send(2, Msg::small(1, &[7])).map_err(|e| e.to_string())?;
    let ok = h.run(
        &mut [&mut a, &mut b, &mut c],
        Duration::from_secs(30),
        &mut || len(&ups) >= 3,
    );
    h.run(
        &mut [&mut a, &mut b, &mut c],
        Duration::from_millis(50),
        &mut || false,
    );
    let v = take(&ups);
    ensure(ok && v.len() == 3, || {
        format!("{} upcalls, expected 3: {v:?}", v.len())
    })?;
    let find = |id: MsgId| v.iter().find(|x| x.msg_id == id).cloned();
    let bad = find(bad_id).ok_or("no upcall for the wrong-tag message")?;
    ensure(
        bad.code == ErrorCode::BadTag
            && bad.args == vec![5]
            && bad.payload == body
            && bad.dest == b.name(),
        || format!("wrong-tag upcall wrong: {bad:?}"),
    )?;
    let nh = find(nh_id).ok_or("no upcall for the missing handler")?;
    ensure(nh.code == ErrorCode::NoHandler && nh.handler == 9, || {
        format!("{nh:?}")
    })?;
    let vn = find(vn_id).ok_or("no upcall for the other-vnet endpoint")?;
    ensure(vn.code == ErrorCode::NoEndpoint, || {
        format!("other vnet gave {vn:?}")
    })?;
    ensure(take(&ran).is_empty(), || {
        "a handler ran for a wrong-tag message".into()
    })?;
    ensure(b.stats().bad_tag_dropped == 1, || {
        format!(
            "receiver counted {} bad-tag drops",
            b.stats().bad_tag_dropped
        )
    })?;
    Ok(())
}

/// Messages to a dead peer come back as `Unreachable`, each once, in order, within the
/// bound; the survivor keeps working with another peer; a restarted peer is reachable.
pub fn check_dead_peer_and_restart<H: Harness>(h: &mut H) -> CheckResult {
    let (mut a, b) = pair(h);
    let bname = b.name();
    let mut cc = h.base_config();
    cc.tag = Tag(0xc);
    let mut c = h.endpoint(cc);
    let got_c: Log<u64> = log();
    let g = got_c.clone();
    c.register(1, move |_, m| g.lock().unwrap().push(m.args[0]))
        .unwrap();
    a.map(1, c.name(), c.tag()).unwrap();
    let ups: Log<Undeliverable> = log();
    let u = ups.clone();
    a.set_upcall(move |_, x| u.lock().unwrap().push(x));
    h.kill(b);
    let start = h.now();
    let mut ids = Vec::new();
    for i in 0..20u64 {
        let body = pattern(i, 100 * i as usize);
        let args = [i];
        let slices = [&body[..]];
        let msg = if i % 2 == 0 {
            Msg::small(1, &args)
        } else {
            Msg::medium(1, &args, &slices)
        };
        ids.push(a.send(0, msg).map_err(|e| e.to_string())?);
    }
    for i in 0..10u64 {
        a.send(1, Msg::small(1, &[i])).map_err(|e| e.to_string())?;
    }
    let bound = a.core().config().unreachable_timeout + SLACK;
    let ok = h.run(&mut [&mut a, &mut c], bound + SLACK, &mut || {
        len(&ups) >= 20 && len(&got_c) >= 10
    });
    let elapsed = Duration::from_nanos(h.now().since_ns(start));
    h.run(
        &mut [&mut a, &mut c],
        Duration::from_millis(50),
        &mut || false,
    );
    let v = take(&ups);
    ensure(ok, || {
        format!(
            "{} upcalls of 20, {} of 10 at the live peer",
            v.len(),
            len(&got_c)
        )
    })?;
    ensure(elapsed <= bound, || {
        format!("upcalls took {elapsed:?} > {bound:?}")
    })?;
    let got: Vec<MsgId> = v.iter().map(|x| x.msg_id).collect();
    ensure(got == ids, || {
        format!("upcalls not each once in order: {got:?} vs {ids:?}")
    })?;
    ensure(
        v.iter()
            .all(|x| x.code == ErrorCode::Unreachable && x.dest == bname),
        || "upcall codes not all Unreachable".into(),
    )?;
    ensure(take(&got_c) == (0..10).collect::<Vec<u64>>(), || {
        "the live peer's stream broke".into()
    })?;

    // Restart B at the same address: a new incarnation, reachable again within 2 s.
    let mut cb = h.base_config();
    cb.tag = Tag(0xb0b);
    let mut b2 = h.endpoint_at(bname.addr, cb);
    let got_b: Log<u64> = log();
    let g = got_b.clone();
    b2.register(1, move |_, m| g.lock().unwrap().push(m.args[0]))
        .unwrap();
    let start = h.now();
    a.send(0, Msg::small(1, &[1000]))
        .map_err(|e| e.to_string())?;
    let ok = h.run(&mut [&mut a, &mut b2], Duration::from_secs(2), &mut || {
        len(&got_b) >= 1
    });
    let elapsed = Duration::from_nanos(h.now().since_ns(start));
    ensure(ok && take(&got_b) == vec![1000], || {
        format!(
            "restarted peer not reached within 2 s (after {elapsed:?}): {:?}",
            take(&got_b)
        )
    })?;
    Ok(())
}

/// A peer of another protocol version is refused, naming both versions.
pub fn check_version<H: Harness>(h: &mut H) -> CheckResult {
    let (mut a, _) = pair(h);
    let mut cfg = h.base_config();
    cfg.protocol_version = am_core::types::PROTOCOL_VERSION + 98;
    cfg.tag = Tag(5);
    let mut old = h.endpoint(cfg);
    old.register(1, |_, _| {}).unwrap();
    a.map(3, old.name(), old.tag()).unwrap();
    let ups: Log<Undeliverable> = log();
    let u = ups.clone();
    a.set_upcall(move |_, x| u.lock().unwrap().push(x));
    a.send(3, Msg::small(1, &[1])).map_err(|e| e.to_string())?;
    let ok = h.run(
        &mut [&mut a, &mut old],
        Duration::from_secs(10),
        &mut || len(&ups) >= 1,
    );
    let v = take(&ups);
    ensure(ok && v.len() == 1, || {
        format!("{} upcalls for the refused message", v.len())
    })?;
    let want = ErrorCode::VersionMismatch {
        local: am_core::types::PROTOCOL_VERSION,
        remote: am_core::types::PROTOCOL_VERSION + 98,
    };
    ensure(v[0].code == want, || {
        format!("refusal was {:?}, expected {want:?}", v[0].code)
    })?;
    let text = v[0].code.to_string();
    ensure(
        text.contains(&format!("version {}", am_core::types::PROTOCOL_VERSION))
            && text.contains("version 99"),
        || format!("the refusal does not name both versions: {text}"),
    )?;
    ensure(old.stats().messages_handled == 0, || {
        "the other version ran a handler".into()
    })?;
    Ok(())
}

/// A receiver that never polls makes the sender's queue fill: `WouldBlock`, with the
/// sender's memory under its stated bound.
pub fn check_would_block<H: Harness>(h: &mut H) -> CheckResult {
    let (mut a, b) = pair(h);
    let body = vec![1u8; 1000];
    let mut sent = 0usize;
    let cap = a.core().config().send_queue_messages + am_core::engine::MAX_WINDOW as usize * 8;
    loop {
        match a.send(0, Msg::medium(1, &[sent as u64], &[&body])) {
            Ok(_) => sent += 1,
            Err(AmError::WouldBlock) => break,
            Err(e) => return Err(format!("unexpected error {e}")),
        }
        if sent.is_multiple_of(64) {
            // Let the sender run (the receiver does not): the window fills too.
            h.run(&mut [&mut a], Duration::from_millis(2), &mut || false);
        }
        if sent > cap {
            return Err(format!("{sent} sends to a stalled receiver never blocked"));
        }
    }
    let pool = am_core::engine::POOL_BUFFERS * (a.transport().capabilities().max_datagram + 64);
    let bound = a.core().memory_bound_per_peer() + pool;
    let used = a.memory_in_use();
    ensure(used <= bound, || {
        format!("sender holds {used} bytes, bound {bound}")
    })?;
    drop(b);
    Ok(())
}

/// What a receiver cannot take comes back with its code: a bulk outside its segment
/// (`SegmentBounds`), a medium above its bound (`Congested`), a reply after the request
/// timed out (`ReplyRejected` at the replier, `Unreachable` at the requester).
pub fn check_rejections<H: Harness>(h: &mut H) -> CheckResult {
    let mut ca = h.base_config();
    ca.tag = Tag(0xa);
    ca.request_timeout = Duration::from_millis(300);
    let mut cb = h.base_config();
    cb.tag = Tag(0xb);
    cb.max_medium_bytes = 1024;
    cb.segment_bytes = 64 << 10;
    let mut a = h.endpoint(ca);
    let mut b = h.endpoint(cb);
    a.map(0, b.name(), b.tag()).unwrap();
    let ran: Log<u16> = log();
    let r = ran.clone();
    b.register(1, move |_, m| r.lock().unwrap().push(m.handler))
        .unwrap();
    let held: Arc<Mutex<Option<am_core::ReplyToken>>> = Arc::default();
    let hd = held.clone();
    b.register(2, move |_, mut m| *hd.lock().unwrap() = m.token.take())
        .unwrap();
    a.register(3, |_, _| {}).unwrap();
    let ups_a: Log<Undeliverable> = log();
    let u = ups_a.clone();
    a.set_upcall(move |_, x| u.lock().unwrap().push(x));
    let ups_b: Log<Undeliverable> = log();
    let u = ups_b.clone();
    b.set_upcall(move |_, x| u.lock().unwrap().push(x));

    let big = pattern(3, 2000);
    let seg_id = a
        .send(0, Msg::bulk(1, &[1], &[(0, 4096)], (64 << 10) - 100))
        .map_err(|e| e.to_string())?;
    let med_id = a
        .send(0, Msg::medium(1, &[2], &[&big]))
        .map_err(|e| e.to_string())?;
    let req = a
        .request(0, Msg::small(2, &[3]))
        .map_err(|e| e.to_string())?;
    let ok = h.run(&mut [&mut a, &mut b], Duration::from_secs(10), &mut || {
        len(&ups_a) >= 3 && held.lock().map(|g| g.is_some()).unwrap_or(false)
    });
    ensure(ok, || format!("upcalls at the sender: {:?}", take(&ups_a)))?;
    let v = take(&ups_a);
    let find = |id: MsgId| v.iter().find(|x| x.msg_id == id).cloned();
    let seg = find(seg_id).ok_or("no upcall for the bulk outside the segment")?;
    ensure(
        seg.code == ErrorCode::SegmentBounds && seg.bulk == Some(((64 << 10) - 100, 4096)),
        || format!("bulk outside the segment gave {seg:?}"),
    )?;
    let med = find(med_id).ok_or("no upcall for the oversized medium")?;
    // The receiver could not hold the payload, so only the arguments come back.
    ensure(
        med.code == ErrorCode::Congested && med.args == vec![2] && med.payload.is_empty(),
        || format!("oversized medium gave {:?}", med.code),
    )?;
    let timed_out = v
        .iter()
        .find(|x| x.request == Some(req))
        .ok_or("no upcall for the timed-out request")?;
    ensure(timed_out.code == ErrorCode::Unreachable, || {
        format!("{timed_out:?}")
    })?;
    ensure(take(&ran).is_empty(), || {
        "a handler ran for a rejected message".into()
    })?;
    // The late reply is refused by the requester and comes back to the replier.
    let token = held
        .lock()
        .ok()
        .and_then(|mut g| g.take())
        .ok_or("no token")?;
    b.ctx()
        .reply(token, Msg::small(3, &[4]))
        .map_err(|e| e.to_string())?;
    let ok = h.run(&mut [&mut a, &mut b], Duration::from_secs(10), &mut || {
        len(&ups_b) >= 1
    });
    let vb = take(&ups_b);
    ensure(
        ok && vb.len() == 1 && vb[0].code == ErrorCode::ReplyRejected && vb[0].args == vec![4],
        || format!("late reply gave {vb:?}"),
    )?;
    ensure(a.stats().replies_handled == 0, || {
        "the late reply ran a handler".into()
    })?;
    Ok(())
}

/// Every check, in order; the first failure names the check.
pub fn run_suite<H: Harness>(h: &mut H) -> CheckResult {
    check_classes(h).map_err(|e| format!("classes: {e}"))?;
    check_order(h).map_err(|e| format!("order: {e}"))?;
    check_request_reply(h).map_err(|e| format!("request/reply: {e}"))?;
    check_delegation(h).map_err(|e| format!("delegation: {e}"))?;
    check_gather(h).map_err(|e| format!("gather: {e}"))?;
    check_tags_and_vnets(h).map_err(|e| format!("tags: {e}"))?;
    check_rejections(h).map_err(|e| format!("rejections: {e}"))?;
    check_dead_peer_and_restart(h).map_err(|e| format!("dead peer: {e}"))?;
    check_version(h).map_err(|e| format!("version: {e}"))?;
    check_would_block(h).map_err(|e| format!("would block: {e}"))?;
    Ok(())
}

/// A [`Harness`] over the simulated network.
pub struct SimHarness {
    /// The network.
    pub net: am_core::sim::SimNet,
    /// Base configuration.
    pub config: Config,
    /// Bulk size for the classes check.
    pub bulk: usize,
}

impl SimHarness {
    /// A harness on a network seeded with `seed`.
    pub fn new(seed: u64, faults: am_core::sim::Faults) -> SimHarness {
        SimHarness {
            net: am_core::sim::SimNet::new(seed, faults),
            config: Config {
                segment_bytes: 2 << 20,
                ..Config::default()
            },
            bulk: 256 << 10,
        }
    }
}

impl Harness for SimHarness {
    type T = am_core::sim::SimTransport;
    fn base_config(&self) -> Config {
        self.config.clone()
    }
    fn endpoint(&mut self, cfg: Config) -> Endpoint<Self::T> {
        Endpoint::new(self.net.transport(), cfg)
    }
    fn endpoint_at(&mut self, addr: SocketAddr, cfg: Config) -> Endpoint<Self::T> {
        Endpoint::new(self.net.transport_at(addr), cfg)
    }
    fn kill(&mut self, ep: Endpoint<Self::T>) {
        self.net.kill(ep.name().addr);
    }
    fn run(
        &mut self,
        eps: &mut [&mut Endpoint<Self::T>],
        limit: Duration,
        done: &mut dyn FnMut() -> bool,
    ) -> bool {
        let deadline = self.net.now().plus(limit);
        loop {
            let mut work = 0;
            for ep in eps.iter_mut() {
                work += ep.poll(256).unwrap_or(0);
            }
            if done() {
                return true;
            }
            if work > 0 {
                continue;
            }
            let mut next = self.net.next_delivery();
            for ep in eps.iter() {
                if let Some(t) = ep.core().poll_timeout() {
                    next = Some(next.map_or(t, |n| n.min(t)));
                }
            }
            let now = self.net.now();
            match next {
                Some(t) if t <= deadline => {
                    self.net
                        .advance_to(if t > now { t } else { Time(now.0 + 1) })
                }
                _ => {
                    if now >= deadline {
                        return done();
                    }
                    self.net.advance_to(deadline);
                }
            }
        }
    }
    fn now(&self) -> Time {
        self.net.now()
    }
    fn bulk_bytes(&self) -> usize {
        self.bulk
    }
}
