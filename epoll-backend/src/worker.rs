//! One worker: the epoll loop that drives the core's connection engine. [`Io`] is the driver
//! (the engine's commands become system calls); the loop turns epoll events into the engine's
//! events. Forwarding of one connection is in [`crate::tcp`], UDP in [`crate::udp`].

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{Timespec, epoll};
use socket2::Socket;
use svcproxy_core::engine::{Admission, ConnId, ListenerId};
use svcproxy_core::session::Side;
use svcproxy_core::{
    Connection, Driver, Engine, FlowId, OpenError, Protocol, ServicePortKey, WorkerContext,
};
use svcproxy_sys::dgram::MAX_DATAGRAM;
use svcproxy_sys::socket::{is_resource_exhaustion, open_error};
use svcproxy_sys::stream::{Buffers, Failed, PUMP_BUDGET, Pumped};
use svcproxy_sys::{
    ListenOptions, RecvBatch, Waker, accept, adopt_flow, connect, listen_or_adopt, reset,
};
use tracing::debug;

use crate::tcp::{Conn, pump};
use crate::token::{Kind, Token, watch};

/// Connections accepted per listener before other work gets a turn.
const ACCEPT_BATCH: usize = 64;
/// epoll events per wait.
const EVENTS: usize = 256;
/// What connection sockets are watched for (edge-triggered).
const CONN_EVENTS: epoll::EventFlags = epoll::EventFlags::IN
    .union(epoll::EventFlags::OUT)
    .union(epoll::EventFlags::RDHUP)
    .union(epoll::EventFlags::ET);

/// Work that was cut short to let other work run, continued next turn.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Work {
    Accept(ListenerId),
    Pump(ConnId),
    Udp(ListenerId),
    Replies(FlowId),
}

/// The driver: the epoll instance and what forwarding needs.
pub(crate) struct Io {
    pub(crate) epoll: OwnedFd,
    pub(crate) buffers: Buffers,
    pub(crate) batch: RecvBatch,
    pub(crate) ready: VecDeque<Work>,
    listen_options: ListenOptions,
    /// UDP receiving is paused for a handover: datagrams wait in the sockets.
    pub(crate) udp_paused: bool,
}

pub(crate) struct Worker {
    pub(crate) engine: Engine<Io>,
    pub(crate) io: Io,
    waker: Arc<Waker>,
}

impl Driver for Io {
    type Listener = Socket;
    type Conn = Conn;
    type Flow = Socket;

    fn listen(
        &mut self,
        id: ListenerId,
        key: ServicePortKey,
        transparent: bool,
        serving: bool,
        inherited: Option<OwnedFd>,
    ) -> io::Result<Socket> {
        let socket = listen_or_adopt(key, &self.listen_options, transparent, inherited)?;
        let (kind, work) = match key.protocol {
            Protocol::Tcp => (Kind::TcpListener, Work::Accept(id)),
            Protocol::Udp => (Kind::UdpListener, Work::Udp(id)),
        };
        let flags = epoll::EventFlags::IN | epoll::EventFlags::ET;
        watch(&self.epoll, &socket, Token::new(kind, id), flags)?;
        // Edge-triggered: whatever arrived before the watch is taken now (or when serving
        // begins).
        if serving {
            self.ready.push_back(work);
        }
        Ok(socket)
    }

    fn local_addr(&self, conn: &Conn) -> io::Result<SocketAddr> {
        svcproxy_sys::local_addr(&conn.client)
    }

    fn unlisten(&mut self, _: ListenerId, socket: Socket) {
        drop(socket);
    }

    fn accepting(&mut self, id: ListenerId, _: &mut Socket, on: bool) {
        // Accepting stops by itself (the accept loop asks the engine); it resumes with a look
        // at the queue, since no new edge may come for clients already waiting there.
        if on {
            self.ready.push_back(Work::Accept(id));
        }
    }

    fn out_of_resources(&mut self) {
        self.buffers.pipes.clear();
    }

    fn connect(
        &mut self,
        id: ConnId,
        conn: &mut Conn,
        to: SocketAddr,
        source: Option<SocketAddr>,
    ) -> Result<(), OpenError> {
        conn.backend = None;
        let socket = connect(to, Protocol::Tcp, source, source.is_some()).map_err(open_error)?;
        watch(
            &self.epoll,
            &socket,
            Token::new(Kind::Backend, id),
            CONN_EVENTS,
        )
        .map_err(open_error)?;
        conn.backend = Some(socket);
        *conn.streams.ready_mut(Side::Backend) = Default::default();
        Ok(())
    }

    fn abort_connect(&mut self, _: ConnId, conn: &mut Conn) -> bool {
        conn.backend = None;
        true
    }

    fn forward(&mut self, id: ConnId, conn: &mut Connection<Conn>) {
        let conn = &mut conn.io;
        // The client is watched from now on; bytes it sent meanwhile are reported at once.
        match watch(
            &self.epoll,
            &conn.client,
            Token::new(Kind::Client, id),
            CONN_EVENTS,
        ) {
            Ok(()) => self.ready.push_back(Work::Pump(id)),
            Err(e) => {
                debug!(error = %e, "cannot watch a client");
                // Without events the connection cannot move: let the peers see it end.
                conn.broken = true;
                self.ready.push_back(Work::Pump(id));
            }
        }
    }

    fn close(
        &mut self,
        closed: Option<(ConnId, Admission)>,
        mut conn: Conn,
        reset_side: Option<Side>,
    ) {
        conn.streams.release_pipes(&mut self.buffers.pipes);
        {
            let Conn {
                client, backend, ..
            } = conn;
            match reset_side {
                Some(Side::Client) => reset(client),
                Some(Side::Backend) => backend.into_iter().for_each(reset),
                None => {}
            }
        }
        // Every descriptor of the connection is closed: the admission may go.
        drop(closed);
    }

    fn open_flow(
        &mut self,
        id: FlowId,
        endpoint: SocketAddr,
        source: Option<SocketAddr>,
    ) -> io::Result<Socket> {
        let socket = connect(endpoint, Protocol::Udp, source, source.is_some())?;
        let flags = epoll::EventFlags::IN | epoll::EventFlags::ET;
        watch(&self.epoll, &socket, Token::new(Kind::Flow, id), flags)?;
        Ok(socket)
    }

    fn close_flow(&mut self, socket: Socket) {
        drop(socket);
    }

    fn adopt_flow(
        &mut self,
        id: FlowId,
        fd: OwnedFd,
        endpoint: SocketAddr,
        receiving: bool,
    ) -> io::Result<Socket> {
        let socket = adopt_flow(fd, endpoint)?;
        let flags = epoll::EventFlags::IN | epoll::EventFlags::ET;
        watch(&self.epoll, &socket, Token::new(Kind::Flow, id), flags)?;
        // Edge-triggered: replies that arrived before the watch are taken now (or when
        // receiving begins).
        if receiving {
            self.ready.push_back(Work::Replies(id));
        }
        Ok(socket)
    }

    fn export_listener(&self, l: &Socket) -> io::Result<OwnedFd> {
        l.as_fd().try_clone_to_owned()
    }

    fn export_flow(&self, flow: &Socket) -> io::Result<OwnedFd> {
        flow.as_fd().try_clone_to_owned()
    }

    fn udp_receiving(&mut self, on: bool) {
        self.udp_paused = !on;
    }

    fn listener_receiving(&mut self, id: ListenerId, _: &mut Socket, on: bool) {
        // Edge-triggered: what arrived while paused is taken now.
        if on {
            self.ready.push_back(Work::Udp(id));
        }
    }

    fn flow_receiving(&mut self, id: FlowId, _: &mut Socket, on: bool) {
        if on {
            self.ready.push_back(Work::Replies(id));
        }
    }

    fn listener_quiet(&self, _: &Socket) -> bool {
        // Accepting and receiving are system calls, made only while allowed.
        true
    }

    fn flow_quiet(&self, _: &Socket) -> bool {
        true
    }

    fn release_listener(&mut self, _: ListenerId, socket: Socket) {
        // The epoll registration belongs to the socket, which another process keeps open:
        // without this, its events would go on waking this worker.
        let _ = epoll::delete(&self.epoll, &socket);
        drop(socket);
    }

    fn release_flow(&mut self, socket: Socket) {
        let _ = epoll::delete(&self.epoll, &socket);
        drop(socket);
    }
}

impl Worker {
    pub(crate) fn new(ctx: WorkerContext, waker: Arc<Waker>) -> io::Result<Self> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        watch(&epoll, waker.as_fd(), Token::WAKER, epoll::EventFlags::IN)?;
        let config = *ctx.config();
        Ok(Self {
            io: Io {
                epoll,
                buffers: Buffers::new(config.pipe_size),
                batch: RecvBatch::new(config.udp_batch, MAX_DATAGRAM + 1),
                ready: VecDeque::new(),
                listen_options: ListenOptions {
                    backlog: config.listen_backlog as i32,
                    ..ListenOptions::default()
                },
                udp_paused: false,
            },
            engine: Engine::new(ctx),
            waker,
        })
    }

    pub(crate) fn run(&mut self) -> io::Result<()> {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(EVENTS);
        self.engine.start(&mut self.io, Instant::now());
        loop {
            let now = Instant::now();
            self.engine.poll(&mut self.io, now);
            if self.engine.finished() {
                return Ok(());
            }
            let timeout = if self.io.ready.is_empty() {
                self.engine
                    .next_deadline()
                    .map(|at| at.saturating_duration_since(now))
            } else {
                Some(Duration::ZERO)
            };
            let timeout = timeout.map(|d| Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: i64::from(d.subsec_nanos()),
            });
            events.clear();
            match epoll::wait(
                &self.io.epoll,
                rustix::buffer::spare_capacity(&mut events),
                timeout.as_ref(),
            ) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let now = Instant::now();
            for event in &events {
                let (flags, data) = (event.flags, event.data);
                self.dispatch(Token(data.u64()), flags, now);
            }
            for _ in 0..self.io.ready.len() {
                match self.io.ready.pop_front() {
                    Some(Work::Accept(id)) => self.accept(id, now),
                    Some(Work::Pump(id)) => self.pump(id, now),
                    Some(Work::Udp(id)) => self.udp_from_clients(id, now),
                    Some(Work::Replies(id)) => self.udp_from_backend(id, now),
                    None => break,
                }
            }
        }
    }

    fn dispatch(&mut self, token: Token, flags: epoll::EventFlags, now: Instant) {
        match token.kind() {
            Some(Kind::Waker) => {
                // A publish, shutdown, or connection budget freed by another worker.
                self.waker.reset();
                self.engine.woken(&mut self.io, now);
            }
            Some(Kind::TcpListener) => self.accept(token.id(), now),
            Some(Kind::UdpListener) => self.udp_from_clients(token.id(), now),
            Some(Kind::Flow) => self.udp_from_backend(token.id(), now),
            Some(kind @ (Kind::Client | Kind::Backend)) => {
                let id = token.id();
                let Some(conn) = self.engine.conn_mut(id) else {
                    return;
                };
                let side = if kind == Kind::Client {
                    Side::Client
                } else {
                    Side::Backend
                };
                let trouble = flags.intersects(epoll::EventFlags::ERR | epoll::EventFlags::HUP);
                let ready = conn.io.streams.ready_mut(side);
                ready.readable |=
                    trouble || flags.intersects(epoll::EventFlags::IN | epoll::EventFlags::RDHUP);
                ready.writable |= trouble || flags.contains(epoll::EventFlags::OUT);
                ready.peer_closed |= trouble || flags.contains(epoll::EventFlags::RDHUP);
                if conn.state.connected() {
                    self.pump(id, now);
                } else if side == Side::Backend && trouble {
                    if let Some(backend) = &conn.io.backend {
                        let error = match backend.take_error() {
                            Ok(Some(e)) | Err(e) => e,
                            Ok(None) => io::Error::other("hang-up while connecting"),
                        };
                        debug!(backend = ?conn.state.backend_addr(), %error, "connect failed");
                    }
                    self.engine.connect_failed(&mut self.io, id, now);
                } else if side == Side::Backend && flags.contains(epoll::EventFlags::OUT) {
                    self.engine.connected(&mut self.io, id, now);
                }
            }
            None => {}
        }
    }

    fn accept(&mut self, listener: ListenerId, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            if !self.engine.may_accept() {
                return;
            }
            let Some(l) = self.engine.listener(listener) else {
                return;
            };
            match accept(&l.io) {
                Ok((socket, peer)) => {
                    let conn = Conn::new(socket);
                    self.engine
                        .accepted(&mut self.io, listener, conn, peer, now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_resource_exhaustion(&e) => {
                    self.engine
                        .out_of_resources(&mut self.io, "accept", &e, now);
                    return;
                }
                Err(e) => debug!(error = %e, "accept failed"),
            }
        }
        self.io.ready.push_back(Work::Accept(listener));
    }

    fn pump(&mut self, id: ConnId, now: Instant) {
        let Some(conn) = self.engine.conn_mut(id) else {
            return;
        };
        if !conn.state.connected() {
            return;
        }
        let mut budget = PUMP_BUDGET;
        match pump(conn, &mut self.io.buffers, &mut budget, now) {
            Ok(Pumped::Idle) => {}
            Ok(Pumped::Budget) => self.io.ready.push_back(Work::Pump(id)),
            Ok(Pumped::Finished) => self.engine.close(&mut self.io, id, None),
            Err(Failed(side)) => self.engine.failed(&mut self.io, id, side),
        }
    }
}
