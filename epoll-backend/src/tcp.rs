//! One proxied TCP connection: its two sockets and their forwarding state, pumped by
//! [`svcproxy_sys::stream`] (splice for streams, copies for small transfers) from epoll's
//! edge-triggered readiness.

use std::time::Instant;

use socket2::Socket;
use svcproxy_core::Connection;
use svcproxy_core::session::Side;
use svcproxy_sys::stream::{Buffers, Failed, Pumped, Streams};

/// A connection's sockets and forwarding state (the engine keeps the rest).
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) client: Socket,
    /// The socket of the connect attempt under way, or connected.
    pub(crate) backend: Option<Socket>,
    pub(crate) streams: Streams,
    /// The client could not be watched: the connection ends at its first pump.
    pub(crate) broken: bool,
}

impl Conn {
    pub(crate) fn new(client: Socket) -> Self {
        Self {
            client,
            backend: None,
            streams: Streams::default(),
            broken: false,
        }
    }
}

/// Moves bytes both ways until sockets would block, the budget is spent, or the connection
/// ends.
pub(crate) fn pump(
    conn: &mut Connection<Conn>,
    buffers: &mut Buffers,
    budget: &mut usize,
    now: Instant,
) -> Result<Pumped, Failed> {
    let Connection { io, state } = conn;
    if io.broken {
        return Err(Failed(Side::Client));
    }
    let Some(backend) = io.backend.as_ref() else {
        return Ok(Pumped::Idle);
    };
    io.streams
        .pump([&io.client, backend], state, buffers, budget, now)
}
