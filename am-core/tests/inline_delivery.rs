//! Zero-copy receive: a medium that arrives whole and in order is handed to its handler
//! where the transport received it (the handler's payload lies inside the datagram the
//! transport delivered); a fragmented one is reassembled into the layer's own buffer.
//! Both arrive byte-exact, in order, and the reply path works from inline payloads too.

use am_core::sim::{Faults, SimNet, SimTransport};
use am_core::{
    Capabilities, Config, Endpoint, EventMask, Msg, Notify, Tag, Time, Transmit, Transport,
    TransportError,
};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The simulated transport, recording where each datagram it hands over lies.
struct Probe {
    inner: SimTransport,
    seen: Arc<Mutex<Vec<(usize, usize)>>>,
}

impl Transport for Probe {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr()
    }
    fn now(&self) -> Time {
        self.inner.now()
    }
    fn seed(&self) -> u64 {
        self.inner.seed()
    }
    fn send_batch(&mut self, batch: &[Transmit]) -> Result<usize, TransportError> {
        self.inner.send_batch(batch)
    }
    fn recv_batch(
        &mut self,
        max: usize,
        deliver: &mut dyn FnMut(SocketAddr, &[u8]),
    ) -> Result<usize, TransportError> {
        let seen = self.seen.clone();
        self.inner.recv_batch(max, &mut |from, b| {
            seen.lock().unwrap().push((b.as_ptr() as usize, b.len()));
            deliver(from, b)
        })
    }
    fn wait(&mut self, timeout: Option<Duration>, mask: EventMask) -> Result<(), TransportError> {
        self.inner.wait(timeout, mask)
    }
    fn notifier(&self) -> Arc<dyn Notify> {
        self.inner.notifier()
    }
}

type Got = Arc<Mutex<Vec<(u64, Vec<u8>, bool)>>>;
type Replies = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

#[test]
fn whole_mediums_are_handed_over_in_place() {
    let net = SimNet::new(7, Faults::none());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut a = Endpoint::new(
        net.transport(),
        Config {
            tag: Tag(1),
            ..Config::default()
        },
    );
    let mut b = Endpoint::new(
        Probe {
            inner: net.transport(),
            seen: seen.clone(),
        },
        Config {
            tag: Tag(2),
            ..Config::default()
        },
    );
    a.map(0, b.name(), b.tag()).unwrap();
    b.map(0, a.name(), a.tag()).unwrap();
    // At b: the payload, and whether it lay inside a datagram the transport handed over
    // (checked while the handler runs, when that datagram is still the transport's).
    let got: Got = Arc::default();
    let g = got.clone();
    let s = seen.clone();
    b.register(1, move |ctx, mut m| {
        let p = m.payload.as_ptr() as usize;
        let inside = s
            .lock()
            .unwrap()
            .last()
            .is_some_and(|&(at, len)| p >= at && p + m.payload.len() <= at + len);
        g.lock()
            .unwrap()
            .push((m.args[0], m.payload.to_vec(), inside));
        if let Some(t) = m.token.take() {
            let slices = [m.payload];
            let _ = ctx.reply(t, Msg::medium(2, m.args, &slices));
        }
    })
    .unwrap();
    let replies: Replies = Arc::default();
    let r = replies.clone();
    a.register(2, move |_, m| {
        r.lock().unwrap().push((m.args[0], m.payload.to_vec()))
    })
    .unwrap();
    let max = a.core().config().max_medium_bytes;
    let payload =
        |i: u64, n: usize| -> Vec<u8> { (0..n).map(|j| (i as usize * 31 + j) as u8).collect() };
    let sizes = [1usize, 100, 1000, 1400, 3000, max];
    for (i, &n) in sizes.iter().enumerate() {
        a.request(0, Msg::medium(1, &[i as u64], &[&payload(i as u64, n)]))
            .unwrap();
    }
    for _ in 0..2000 {
        a.poll(64).unwrap();
        b.poll(64).unwrap();
        net.advance_to(Time(net.now().0 + 20_000));
        if replies.lock().unwrap().len() == sizes.len() {
            break;
        }
    }
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), sizes.len(), "every medium handled");
    let mtu = b.transport().capabilities().max_datagram;
    for (i, &n) in sizes.iter().enumerate() {
        let (seq, bytes, inside) = &got[i];
        assert_eq!(*seq, i as u64, "in order");
        assert_eq!(*bytes, payload(i as u64, n), "medium {n} B byte-exact");
        // Whole in one datagram (with its header): in place; fragmented: copied.
        let whole = n + 100 < mtu;
        let fragmented = n > mtu;
        if whole {
            assert!(*inside, "a {n}-byte medium was copied (mtu {mtu})");
        }
        if fragmented {
            assert!(
                !*inside,
                "a fragmented {n}-byte medium cannot lie in one datagram"
            );
        }
    }
    let replies = replies.lock().unwrap().clone();
    for (i, &n) in sizes.iter().enumerate() {
        assert_eq!(replies[i], (i as u64, payload(i as u64, n)), "reply {i}");
    }
}
