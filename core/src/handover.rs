//! Handing a running proxy's sockets to another process: a restart or an upgrade that drops
//! nothing.
//!
//! A new process asks the running one for its sockets; the running one's workers each
//! *export* theirs ([`WorkerSockets`]: a duplicate of every listening socket, and of every UDP
//! flow's socket with what the flow table knows of it, [`HandedFlow`]). Before exporting, a
//! worker stops receiving UDP (on listeners and flows) and waits until no receive is in
//! flight, so that its flow table is final: datagrams that arrive meanwhile wait in the
//! sockets' buffers, which both processes share. TCP listeners keep accepting: the accept
//! queue is shared too, and a connection accepted by either process is served by it.
//!
//! The new process starts its workers with the exported sockets as its *inheritance*, in
//! [`Phase::Inheriting`]: worker `i` takes over worker `i`'s listeners (a frontend it listens
//! on adopts the inherited socket instead of binding a new one, so the accept queue carries
//! over) and its flows (each continues to its endpoint, if the table still serves it there),
//! but neither accepts nor receives yet: a new process that fails while starting has touched
//! no traffic. Then the old process *retires*: it stops accepting for good (each worker
//! reports once no accept of its is in flight: a client it accepted is its to serve, and no
//! accepted client is dropped), receives no more UDP, and finishes its TCP connections; its
//! descriptors close without ending the sockets, which live on in the new process. Meanwhile a
//! retired worker opens no new listener (the new process would not know it). Then the new one
//! serves ([`Phase::Serving`]). In between, clients wait in the accept queues and datagrams in
//! the socket buffers: none is refused or lost. If the new process fails before it serves,
//! the old one *resumes*, even from retired: it receives and accepts again, and opens what it
//! left unopened.
//!
//! Phases, as [`Control`](crate::Control) holds them. The old process: [`Phase::Serving`] ->
//! [`Phase::Exporting`] (each worker pauses UDP, then deposits its sockets) ->
//! [`Phase::Retired`] (each worker reports when it has), or back to [`Phase::Serving`] from
//! either. The new one: [`Phase::Inheriting`] -> [`Phase::Serving`]. A worker the supervisor
//! restarts follows the phase it finds.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::time::Duration;

use crate::flow::FlowKey;
use crate::model::ServicePortKey;

/// Where a proxy is in a handover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Serving as usual.
    Serving,
    /// Started on inherited sockets: listening, neither accepting nor receiving until the
    /// process that handed them over has retired.
    Inheriting,
    /// Workers pause UDP and export their sockets.
    Exporting,
    /// Another process serves the sockets: accept nothing, receive nothing, finish the
    /// connections open.
    Retired,
}

impl Phase {
    pub(crate) fn as_u8(self) -> u8 {
        match self {
            Phase::Serving => 0,
            Phase::Exporting => 1,
            Phase::Retired => 2,
            Phase::Inheriting => 3,
        }
    }

    pub(crate) fn from_u8(v: u8) -> Self {
        match v {
            1 => Phase::Exporting,
            2 => Phase::Retired,
            3 => Phase::Inheriting,
            _ => Phase::Serving,
        }
    }
}

/// A UDP flow as it is handed over: who, where, and how long it has been idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandedFlow {
    /// The client and the local address it sent to.
    pub key: FlowKey,
    /// The listener's frontend (see [`crate::Flow::listener`]).
    pub listener: ServicePortKey,
    /// The endpoint the flow goes to.
    pub endpoint: SocketAddr,
    /// Time since its last datagram.
    pub idle: Duration,
    /// Whether a reply has come back on it.
    pub replied: bool,
}

/// One worker's sockets, handed over (or inherited): listeners by frontend, and UDP flows.
#[derive(Debug, Default)]
pub struct WorkerSockets {
    /// Listening sockets (TCP listening, UDP bound), by the key they were opened for.
    pub listeners: Vec<(ServicePortKey, OwnedFd)>,
    /// UDP flows, each with its backend-side socket (connected to the endpoint).
    pub flows: Vec<(HandedFlow, OwnedFd)>,
}

impl WorkerSockets {
    /// Number of descriptors held.
    pub fn len(&self) -> usize {
        self.listeners.len() + self.flows.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the listener inherited for `key`, if any.
    pub(crate) fn take_listener(&mut self, key: &ServicePortKey) -> Option<OwnedFd> {
        let at = self.listeners.iter().position(|(k, _)| k == key)?;
        Some(self.listeners.swap_remove(at).1)
    }
}
