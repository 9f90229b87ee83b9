//! The flow table of one UDP listener, owned by its receive task (so the
//! per-datagram path takes no lock): find or open the client's flow, move it
//! off a backend that became ineligible or refused, enforce
//! `max_connections`, and remove flows whose relay task has ended.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::flow::{End, Flow, RelayCtx, Stop};
use crate::backend::Slot;
use crate::listener::Listener;
use crate::stats::DropReason;

pub(super) struct FlowTable {
    listener: Arc<Listener>,
    flows: HashMap<SocketAddr, Entry>,
    max: usize,
    ctx: Arc<RelayCtx>,
    ended: mpsc::UnboundedReceiver<Arc<Flow>>,
}

/// A live flow and the handle that ends it. Dropping the table drops every
/// handle, which ends every flow with `end=shutdown`.
struct Entry {
    flow: Arc<Flow>,
    stop: Stop,
}

impl FlowTable {
    pub(super) fn new(listener: Arc<Listener>, socket: Arc<UdpSocket>, tracker: TaskTracker) -> FlowTable {
        let spec = listener.snapshot().spec.clone();
        // Unbounded, yet bounded in practice: each flow sends itself once.
        let (tx, ended) = mpsc::unbounded_channel();
        let ctx = Arc::new(RelayCtx {
            listener: listener.clone(),
            socket,
            ended: tx,
            tracker,
            idle: spec.idle_timeout,
        });
        FlowTable {
            listener,
            flows: HashMap::new(),
            max: spec.max_connections,
            ctx,
            ended,
        }
    }

    /// The next flow whose relay task ended.
    pub(super) async fn next_ended(&mut self) -> Arc<Flow> {
        match self.ended.recv().await {
            Some(flow) => flow,
            // Never: `ctx` holds a sender for as long as the table lives.
            None => std::future::pending().await,
        }
    }

    /// Remove `flow`, unless its client already has a newer flow.
    pub(super) fn remove_ended(&mut self, flow: Arc<Flow>) {
        if self
            .flows
            .get(&flow.client)
            .is_some_and(|e| Arc::ptr_eq(&e.flow, &flow))
        {
            self.flows.remove(&flow.client);
        }
    }

    /// Forward one datagram from `client` to its flow's backend, opening or
    /// moving the flow as needed. Awaits only when the upstream socket's
    /// send buffer is full.
    pub(super) async fn forward(&mut self, client: SocketAddr, data: &[u8]) {
        let stats = &self.listener.stats;
        stats.rx_bytes.fetch_add(data.len() as u64, Relaxed);
        stats.rx_datagrams.fetch_add(1, Relaxed);
        let Some(Entry { flow, .. }) = self.flows.get(&client) else {
            return self.forward_new(client, data).await;
        };
        let why = if flow.has_ended() {
            None
        } else if flow.was_refused() {
            Some(End::BackendRefused)
        } else if !flow.backend.is_eligible() && !self.listener.snapshot().fail_open {
            // Failing open, every backend is ineligible: moving would not help.
            Some(End::BackendUnhealthy)
        } else {
            match flow.send(data).await {
                Ok(()) => return,
                // A refusal reported on send: move the flow now, resend there.
                Err(e) => {
                    flow.backend_failed(&self.listener, &e);
                    Some(End::BackendRefused)
                }
            }
        };
        let old = self.flows.remove(&client).expect("the flow was just found");
        let Some(why) = why else {
            // Ended (idle) while this datagram was on its way: start afresh.
            return self.forward_new(client, data).await;
        };
        self.reschedule(old, why, data).await
    }

    /// Move `old` to another backend if there is one, and send `data` there.
    async fn reschedule(&mut self, old: Entry, why: End, data: &[u8]) {
        let (client, from) = (old.flow.client, old.flow.backend.addr);
        match self.pick(client.ip(), Some(from)) {
            Pick::Stay => {
                // Nowhere else to go: keep the flow and its upstream socket.
                old.flow.clear_refused();
                if let Err(e) = old.flow.send(data).await {
                    old.flow.backend_failed(&self.listener, &e);
                }
                self.flows.insert(client, old);
            }
            next => {
                debug!(listener = %self.listener.name(), client = %client, from = %from, reason = why.as_str(), "udp flow re-scheduled");
                old.stop.stop(why);
                self.open_and_send(client, next, data).await;
            }
        }
    }

    async fn forward_new(&mut self, client: SocketAddr, data: &[u8]) {
        if self.flows.len() >= self.max {
            self.reap();
            if self.flows.len() >= self.max {
                self.listener.stats.drop_one(DropReason::Limit);
                debug!(listener = %self.listener.name(), client = %client, "max_connections reached: udp datagram dropped");
                return;
            }
        }
        let pick = self.pick(client.ip(), None);
        self.open_and_send(client, pick, data).await
    }

    async fn open_and_send(&mut self, client: SocketAddr, pick: Pick, data: &[u8]) {
        let slot = match pick {
            Pick::Slot(slot) => slot,
            Pick::Full => {
                // UDP never queues: a new flow finding every backend full is dropped.
                self.listener.stats.drop_one(DropReason::Full);
                debug!(listener = %self.listener.name(), client = %client, "every backend at max_connections: udp datagram dropped");
                return;
            }
            Pick::Stay | Pick::NoBackend => {
                self.listener.stats.drop_one(DropReason::NoBackend);
                debug!(listener = %self.listener.name(), client = %client, "no backend: udp datagram dropped");
                return;
            }
        };
        let addr = slot.backend().addr;
        match Flow::open(&self.ctx, client, slot) {
            Ok((flow, stop)) => {
                self.listener.record(client.ip(), &flow.backend);
                if let Err(e) = flow.send(data).await {
                    flow.backend_failed(&self.listener, &e);
                }
                self.flows.insert(client, Entry { flow, stop });
            }
            Err(e) => {
                // Out of file descriptors or ports: nothing the backend did.
                self.listener.stats.drop_one(DropReason::ConnectFailed);
                warn!(listener = %self.listener.name(), client = %client, backend = %addr, error = %e, "cannot open an upstream udp socket");
            }
        }
    }

    /// A slot on the first candidate for `client` other than `exclude` that
    /// has one free; [`Pick::Stay`] if `exclude` (the flow's own backend) is
    /// still a candidate and no other is. UDP has no connect to fail, so
    /// there is nothing to retry on: the first candidate with a slot it is.
    fn pick(&self, client: IpAddr, exclude: Option<SocketAddr>) -> Pick {
        let mut fallback = Pick::NoBackend;
        for b in self.listener.candidates(client) {
            if Some(b.addr) == exclude {
                fallback = Pick::Stay;
                continue;
            }
            match b.try_slot() {
                Some(slot) => return Pick::Slot(slot),
                None if matches!(fallback, Pick::NoBackend) => fallback = Pick::Full,
                None => {}
            }
        }
        fallback
    }

    /// Remove the flows that already ended, without waiting.
    fn reap(&mut self) {
        while let Ok(flow) = self.ended.try_recv() {
            self.remove_ended(flow);
        }
    }
}

/// Where a new (or moving) flow goes.
enum Pick {
    /// A slot on this backend.
    Slot(Slot),
    /// Keep the flow on its backend: it is the only candidate.
    Stay,
    /// Every candidate is at its `max_connections`.
    Full,
    NoBackend,
}
