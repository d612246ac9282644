//! Request/reply: requests and their state, replies, delegation of a reply token, gather
//! (one completion for several requests).

use super::*;

impl Core {
    pub(super) fn new_request(
        &mut self,
        name: EndpointName,
        tag: Tag,
        msg: &Msg<'_>,
        gather: Option<(u64, usize)>,
    ) -> Result<RequestId, AmError> {
        if self.requests.len() >= self.cfg.max_outstanding_requests {
            return Err(AmError::TooManyRequests(self.requests.len()));
        }
        if !self.queue_room(name.addr) {
            return Err(AmError::WouldBlock);
        }
        let mut m = self.build(MsgKind::Request, msg, tag.0)?;
        let req = self.next_req;
        self.next_req += 1;
        m.hdr.req_id = req;
        let deadline = self.now.plus(self.cfg.request_timeout);
        self.requests.insert(
            req,
            ReqState {
                dest: name,
                deadline,
                gather,
                msg_id: m.id,
                handler: msg.handler,
                args: msg.args.to_vec(),
            },
        );
        self.deadlines.insert((deadline, req));
        self.stats.requests_sent += 1;
        self.enqueue(name.addr, m);
        Ok(RequestId(req))
    }

    /// Sends a request to the endpoint at `index`; its handler gets a reply token.
    pub fn request(&mut self, index: u16, msg: &Msg<'_>) -> Result<RequestId, AmError> {
        let (name, tag) = self.lookup(index)?;
        self.new_request(name, tag, msg, None)
    }

    /// Replies to the requester named by `token` (consumed: at most one reply).
    pub fn reply(&mut self, token: ReplyToken, msg: &Msg<'_>) -> Result<MsgId, AmError> {
        let mut m = self.build(MsgKind::Reply, msg, token.tag)?;
        m.hdr.req_id = token.req_id;
        m.hdr.token_inc = token.inc;
        // A reply is owed: it may exceed the queue bound, up to twice it (a requester that
        // never acknowledges cannot make us hold replies without bound).
        let hard_cap = 2 * self.cfg.send_queue_messages;
        if self
            .peers
            .get(&token.addr)
            .is_some_and(|p| p.queue.len() >= hard_cap)
        {
            return Err(AmError::WouldBlock);
        }
        let id = MsgId(m.id);
        self.stats.replies_sent += 1;
        self.enqueue(token.addr, m);
        Ok(id)
    }

    /// Passes `token` on with a new request to the endpoint at `index`; whoever ends up
    /// holding the token replies straight to the original requester.
    pub fn delegate(
        &mut self,
        token: ReplyToken,
        index: u16,
        msg: &Msg<'_>,
    ) -> Result<MsgId, (AmError, ReplyToken)> {
        let (name, tag) = match self.lookup(index) {
            Ok(x) => x,
            Err(e) => return Err((e, token)),
        };
        if !self.queue_room(name.addr) {
            return Err((AmError::WouldBlock, token));
        }
        let mut m = match self.build(MsgKind::Request, msg, tag.0) {
            Ok(m) => m,
            Err(e) => return Err((e, token)),
        };
        m.token = Some(TokenWire {
            addr: token.addr,
            tag: token.tag,
            req_id: token.req_id,
            inc: token.inc,
        });
        let id = MsgId(m.id);
        self.stats.delegations += 1;
        self.enqueue(name.addr, m);
        Ok(id)
    }

    /// Sends one request per target and runs `completion` once with every result in
    /// target order.
    pub(crate) fn gather(
        &mut self,
        targets: &[(u16, Msg<'_>)],
        completion: GatherFn,
    ) -> Result<(), AmError> {
        if self.requests.len() + targets.len() > self.cfg.max_outstanding_requests {
            return Err(AmError::TooManyRequests(self.requests.len()));
        }
        let mut resolved = Vec::with_capacity(targets.len());
        for (index, _) in targets {
            let (name, tag) = self.lookup(*index)?;
            if !self.queue_room(name.addr) {
                return Err(AmError::WouldBlock);
            }
            resolved.push((name, tag));
        }
        let gid = self.next_gather;
        self.next_gather += 1;
        self.gathers.insert(
            gid,
            GatherState {
                results: vec![None; targets.len()],
                remaining: targets.len(),
                completion,
            },
        );
        for (slot, ((name, tag), (_, msg))) in resolved.into_iter().zip(targets).enumerate() {
            if let Err(e) = self.new_request(name, tag, msg, Some((gid, slot))) {
                // Validation failed for this member: it completes with an error now.
                let code = match e {
                    AmError::WouldBlock | AmError::TooManyRequests(_) => ErrorCode::Congested,
                    _ => ErrorCode::NoHandler,
                };
                self.gather_fill(gid, slot, Err(code));
            }
        }
        if targets.is_empty() {
            self.gather_fill(gid, usize::MAX, Err(ErrorCode::NoEndpoint));
        }
        Ok(())
    }

    pub(super) fn gather_fill(&mut self, gid: u64, slot: usize, r: GatherResult) {
        let done = match self.gathers.get_mut(&gid) {
            Some(g) => {
                if let Some(s) = g.results.get_mut(slot) {
                    if s.is_none() {
                        *s = Some(r);
                        g.remaining -= 1;
                    }
                }
                g.remaining == 0
            }
            None => false,
        };
        if done {
            if let Some(g) = self.gathers.remove(&gid) {
                let results = g
                    .results
                    .into_iter()
                    .map(|r| r.unwrap_or(Err(ErrorCode::Unreachable)))
                    .collect();
                self.events
                    .push_back(Event::GatherDone(g.completion, results));
            }
        }
    }

    /// Outstanding requests.
    pub fn outstanding_requests(&self) -> usize {
        self.requests.len()
    }

    // ------------------------------------------------------------------------------------
    // Input.
}
