//! The connection engine without sockets: events in, the driver's commands out. A recording
//! driver stands in for the data plane; time is passed explicitly.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use svcproxy_core::engine::{Admission, ConnId, ListenerId, OpenError, TICK};
use svcproxy_core::session::{Direction, Side, Step};
use svcproxy_core::*;

/// What the engine asked of the driver. Connections are named by the client's port.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cmd {
    Listen(ServicePortKey),
    Unlisten(ServicePortKey),
    Accepting(bool),
    OutOfResources,
    Connect(u16, SocketAddr),
    Abort(u16),
    Forward(u16),
    Close(u16, Option<Side>),
    CloseFlow(SocketAddr),
    /// Listened on a socket handed over by another process; serving at once?
    Adopt(ServicePortKey, bool),
    /// Went on with a flow socket handed over; receiving at once?
    AdoptFlow(SocketAddr, bool),
    Receiving(bool),
    Release(ServicePortKey),
    ReleaseFlow(SocketAddr),
}

#[derive(Default)]
struct Recorder {
    cmds: Vec<Cmd>,
    /// Results for the next `connect` calls (default: success).
    connects: VecDeque<Result<(), OpenError>>,
    /// Every `listen` fails (address in use) while set.
    listens_fail: bool,
    /// The local address of every accepted client (the frontend it connected to).
    local: Option<SocketAddr>,
    /// A receive is in flight on every UDP socket (after receiving stopped) while set.
    receiving_in_flight: bool,
}

/// A descriptor to stand in for an exported socket.
fn some_fd() -> io::Result<OwnedFd> {
    Ok(std::fs::File::open("/dev/null")?.into())
}

impl Recorder {
    fn take(&mut self) -> Vec<Cmd> {
        std::mem::take(&mut self.cmds)
    }
}

impl Driver for Recorder {
    type Listener = ServicePortKey;
    type Conn = u16;
    type Flow = SocketAddr;

    fn listen(
        &mut self,
        _: ListenerId,
        key: ServicePortKey,
        _: bool,
        serving: bool,
        inherited: Option<OwnedFd>,
    ) -> io::Result<Self::Listener> {
        self.cmds.push(match inherited {
            Some(_) => Cmd::Adopt(key, serving),
            None => Cmd::Listen(key),
        });
        if self.listens_fail {
            return Err(io::Error::from(io::ErrorKind::AddrInUse));
        }
        Ok(key)
    }
    fn local_addr(&self, _: &u16) -> io::Result<SocketAddr> {
        self.local
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
    fn unlisten(&mut self, _: ListenerId, key: Self::Listener) {
        self.cmds.push(Cmd::Unlisten(key));
    }
    fn accepting(&mut self, _: ListenerId, _: &mut Self::Listener, on: bool) {
        self.cmds.push(Cmd::Accepting(on));
    }
    fn out_of_resources(&mut self) {
        self.cmds.push(Cmd::OutOfResources);
    }
    fn connect(
        &mut self,
        _: ConnId,
        conn: &mut u16,
        to: SocketAddr,
        _: Option<SocketAddr>,
    ) -> Result<(), OpenError> {
        self.cmds.push(Cmd::Connect(*conn, to));
        self.connects.pop_front().unwrap_or(Ok(()))
    }
    fn abort_connect(&mut self, _: ConnId, conn: &mut u16) -> bool {
        self.cmds.push(Cmd::Abort(*conn));
        true
    }
    fn forward(&mut self, _: ConnId, conn: &mut Connection<u16>) {
        self.cmds.push(Cmd::Forward(conn.io));
    }
    fn close(&mut self, _: Option<(ConnId, Admission)>, conn: u16, reset: Option<Side>) {
        self.cmds.push(Cmd::Close(conn, reset));
    }
    fn open_flow(
        &mut self,
        _: engine::ListenerId,
        endpoint: SocketAddr,
        _: Option<SocketAddr>,
    ) -> io::Result<SocketAddr> {
        Ok(endpoint)
    }
    fn close_flow(&mut self, flow: SocketAddr) {
        self.cmds.push(Cmd::CloseFlow(flow));
    }
    fn adopt_flow(
        &mut self,
        _: FlowId,
        _: OwnedFd,
        endpoint: SocketAddr,
        receiving: bool,
    ) -> io::Result<SocketAddr> {
        self.cmds.push(Cmd::AdoptFlow(endpoint, receiving));
        Ok(endpoint)
    }
    fn export_listener(&self, _: &ServicePortKey) -> io::Result<OwnedFd> {
        some_fd()
    }
    fn export_flow(&self, _: &SocketAddr) -> io::Result<OwnedFd> {
        some_fd()
    }
    fn udp_receiving(&mut self, _: bool) {}
    fn listener_receiving(&mut self, _: ListenerId, _: &mut ServicePortKey, on: bool) {
        self.cmds.push(Cmd::Receiving(on));
    }
    fn flow_receiving(&mut self, _: FlowId, _: &mut SocketAddr, on: bool) {
        self.cmds.push(Cmd::Receiving(on));
    }
    fn listener_quiet(&self, _: &ServicePortKey) -> bool {
        !self.receiving_in_flight
    }
    fn flow_quiet(&self, _: &SocketAddr) -> bool {
        !self.receiving_in_flight
    }
    fn release_listener(&mut self, _: ListenerId, key: ServicePortKey) {
        self.cmds.push(Cmd::Release(key));
    }
    fn release_flow(&mut self, flow: SocketAddr) {
        self.cmds.push(Cmd::ReleaseFlow(flow));
    }
}

const FRONTEND: &str = "127.0.0.1:8080";

fn ep(i: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 1, i], 9000))
}

fn frontend() -> ServicePortKey {
    ServicePortKey::new(FRONTEND.parse().unwrap(), Protocol::Tcp)
}

fn client(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 2], port))
}

fn set_endpoints(table: &Table, eps: &[SocketAddr]) {
    let eps = eps.iter().map(|&a| Endpoint::new(a)).collect();
    table
        .apply(Batch::new().replace_endpoints("web", eps))
        .unwrap();
}

struct Fixture {
    table: Arc<Table>,
    control: Arc<Control>,
    engine: Engine<Recorder>,
    io: Recorder,
    listener: ListenerId,
    t0: Instant,
}

fn fixture(config: ProxyConfig, endpoints: &[SocketAddr]) -> Fixture {
    let table = Arc::new(Table::default());
    let web = Service::new("web")
        .address("127.0.0.1".parse().unwrap())
        .port(ServicePort::tcp(8080));
    table.apply(Batch::new().upsert(web)).unwrap();
    set_endpoints(&table, endpoints);
    let control = Arc::new(Control::new(table.clone(), config, 1));
    let mut engine = Engine::new(WorkerContext {
        index: 0,
        control: control.clone(),
    });
    let mut io = Recorder::default();
    let t0 = Instant::now();
    engine.start(&mut io, t0);
    assert_eq!(io.take(), vec![Cmd::Listen(frontend())]);
    let listener = engine.listener_id(&frontend()).expect("listening");
    Fixture {
        table,
        control,
        engine,
        io,
        listener,
        t0,
    }
}

impl Fixture {
    fn accept(&mut self, port: u16, now: Instant) {
        self.engine
            .accepted(&mut self.io, self.listener, port, client(port), now);
    }

    /// A client on `port`, accepted and connected at `now`; its connection.
    fn open(&mut self, port: u16, now: Instant) -> ConnId {
        self.accept(port, now);
        let id = self.id(port);
        self.engine.connected(&mut self.io, id, now);
        id
    }

    /// The connection of the client on `port`.
    fn id(&self, port: u16) -> ConnId {
        self.engine
            .connections()
            .find(|(_, c)| c.io == port)
            .map(|(id, _)| id)
            .expect("the connection exists")
    }

    fn stats(&self) -> Vec<(SocketAddr, CounterValues)> {
        self.table.load().stats()[0].endpoints.clone()
    }
}

fn config() -> ProxyConfig {
    ProxyConfig {
        tcp: TcpPolicy {
            connect_timeout: Duration::from_secs(1),
            connect_attempts: 3,
            idle_timeout: Some(Duration::from_secs(10)),
            drain: DrainPolicy::Keep,
        },
        ..ProxyConfig::default()
    }
}

#[test]
fn closed_connections_leave_no_timer_behind() {
    let mut f = fixture(config(), &[ep(1), ep(2)]);
    let baseline = f.engine.timer_count();
    // Miri interprets every step: a few hundred connections show the same there.
    let connections = if cfg!(miri) { 300 } else { 10_000u32 };
    for round in 0..connections {
        let port = 1000 + (round % 50_000) as u16;
        let now = f.t0 + Duration::from_micros(u64::from(round));
        f.accept(port, now);
        let id = f.id(port);
        f.engine.connected(&mut f.io, id, now);
        f.engine.close(&mut f.io, id, None);
    }
    assert_eq!(f.engine.conn_count(), 0);
    assert_eq!(
        f.engine.timer_count(),
        baseline,
        "every connect deadline and idle timer was cancelled with its connection"
    );
    assert_eq!(f.control.connections(), 0, "every budget unit came back");
}

#[test]
fn connect_failures_move_to_the_next_endpoint_then_reset_the_client() {
    let mut f = fixture(config(), &[ep(1), ep(2), ep(3)]);
    // The first socket cannot even be opened (no route): the next endpoint at once.
    f.io.connects
        .push_back(Err(OpenError::Failed(io::Error::other("no route"))));
    f.accept(7, f.t0);
    let first = f.io.take();
    assert_eq!(first.len(), 2, "two attempts: {first:?}");
    let id = f.id(7);
    // The second attempt is refused later.
    f.engine.connect_failed(&mut f.io, id, f.t0);
    assert!(
        matches!(f.io.take()[..], [Cmd::Connect(7, _)]),
        "third endpoint"
    );
    // The third never answers: its deadline is 4 s (1 s doubled twice).
    f.engine
        .poll(&mut f.io, f.t0 + Duration::from_millis(3_999));
    assert!(f.io.take().is_empty(), "not yet");
    f.engine.poll(&mut f.io, f.t0 + Duration::from_secs(4));
    assert_eq!(
        f.io.take(),
        vec![Cmd::Abort(7), Cmd::Close(7, Some(Side::Client))],
        "three attempts were allowed: the client is reset"
    );
    let tried: Vec<SocketAddr> = first
        .iter()
        .filter_map(|c| match c {
            Cmd::Connect(_, to) => Some(*to),
            _ => None,
        })
        .collect();
    assert_ne!(tried[0], tried[1]);
    let errors: u64 = f.stats().iter().map(|(_, v)| v.connect_errors).sum();
    assert_eq!(errors, 3, "each failed attempt counted once");
    let active: u64 = f.stats().iter().map(|(_, v)| v.connections_active).sum();
    assert_eq!(active, 0);
    assert_eq!(f.control.connections(), 0);
    assert_eq!(f.engine.timer_count(), 1, "only the tick is left");
}

#[test]
fn over_budget_clients_wait_without_a_unit_and_are_served_in_order() {
    let mut f = fixture(
        ProxyConfig {
            max_connections: 1,
            ..config()
        },
        &[ep(1)],
    );
    f.accept(1, f.t0);
    assert!(matches!(f.io.take()[..], [Cmd::Connect(1, _)]));
    f.accept(2, f.t0);
    f.accept(3, f.t0);
    assert_eq!(
        f.io.take(),
        vec![Cmd::Accepting(false)],
        "accepting paused once"
    );
    assert_eq!(f.engine.waiting_count(), 2);
    assert_eq!(f.control.connections(), 1, "waiting clients hold no unit");
    let first = f.id(1);
    f.engine.close(&mut f.io, first, None);
    let cmds = f.io.take();
    assert!(
        matches!(cmds[..], [Cmd::Close(1, None), Cmd::Connect(2, _)]),
        "{cmds:?}"
    );
    assert_eq!(f.control.connections(), 1);
    let second = f.id(2);
    f.engine.close(&mut f.io, second, None);
    let cmds = f.io.take();
    assert!(
        matches!(
            cmds[..],
            [
                Cmd::Close(2, None),
                Cmd::Connect(3, _),
                Cmd::Accepting(true)
            ]
        ),
        "the queue is empty again: accepting resumes ({cmds:?})"
    );
}

#[test]
fn shutdown_refuses_waiting_clients_and_the_budget_stays_exact() {
    let mut f = fixture(
        ProxyConfig {
            max_connections: 1,
            ..config()
        },
        &[ep(1)],
    );
    f.open(1, f.t0);
    f.accept(2, f.t0);
    f.accept(3, f.t0);
    f.io.take();
    f.control
        .begin_shutdown(Some(f.t0 + Duration::from_secs(5)));
    f.engine.poll(&mut f.io, f.t0);
    assert_eq!(
        f.io.take(),
        vec![
            Cmd::Unlisten(frontend()),
            Cmd::Close(2, Some(Side::Client)),
            Cmd::Close(3, Some(Side::Client)),
        ]
    );
    assert_eq!(
        f.control.connections(),
        1,
        "refusing waiting clients released nothing"
    );
    assert!(!f.engine.finished());
    f.engine.poll(&mut f.io, f.t0 + Duration::from_secs(5));
    assert_eq!(f.io.take(), vec![Cmd::Close(1, None)]);
    assert!(f.engine.finished());
    assert_eq!(f.control.connections(), 0);
}

#[test]
fn out_of_descriptors_the_client_waits_and_accepting_backs_off() {
    let mut f = fixture(config(), &[ep(1)]);
    f.io.connects
        .push_back(Err(OpenError::Exhausted(io::Error::other("EMFILE"))));
    f.accept(1, f.t0);
    let cmds = f.io.take();
    assert!(
        matches!(
            cmds[..],
            [
                Cmd::Connect(1, _),
                Cmd::OutOfResources,
                Cmd::Accepting(false)
            ]
        ),
        "{cmds:?}"
    );
    assert_eq!(f.engine.waiting_count(), 1);
    assert_eq!(f.control.connections(), 0);
    // The first backoff is 10 ms.
    f.engine.poll(&mut f.io, f.t0 + Duration::from_millis(10));
    let cmds = f.io.take();
    assert!(
        matches!(cmds[..], [Cmd::Connect(1, _), Cmd::Accepting(true)]),
        "{cmds:?}"
    );
    assert_eq!(f.control.connections(), 1);
}

#[test]
fn idle_connections_close_after_the_quiet_period_only() {
    let mut f = fixture(config(), &[ep(1)]);
    let id = f.open(1, f.t0);
    f.io.take();
    f.engine
        .conn_mut(id)
        .unwrap()
        .state
        .active(f.t0 + Duration::from_secs(6));
    f.engine.poll(&mut f.io, f.t0 + Duration::from_secs(10));
    assert!(f.io.take().is_empty(), "active 4 s ago");
    f.engine.poll(&mut f.io, f.t0 + Duration::from_secs(15));
    assert!(f.io.take().is_empty(), "quiet for 9 s");
    f.engine.poll(&mut f.io, f.t0 + Duration::from_secs(16));
    assert_eq!(f.io.take(), vec![Cmd::Close(1, None)]);
    assert_eq!(f.engine.timer_count(), 1);
}

#[test]
fn drain_policy_closes_connections_to_removed_endpoints_after_the_grace() {
    let config = ProxyConfig {
        tcp: TcpPolicy {
            drain: DrainPolicy::CloseAfter(Duration::from_secs(5)),
            ..config().tcp
        },
        ..config()
    };
    let mut f = fixture(config, &[ep(1)]);
    f.open(1, f.t0);
    set_endpoints(&f.table, &[ep(2)]);
    f.io.take();
    f.engine.poll(&mut f.io, f.t0 + Duration::from_secs(1));
    f.engine
        .poll(&mut f.io, f.t0 + Duration::from_millis(5_999));
    assert!(f.io.take().is_empty());
    f.engine.poll(&mut f.io, f.t0 + Duration::from_secs(6));
    assert_eq!(f.io.take(), vec![Cmd::Close(1, None)]);
}

#[test]
fn a_grace_too_long_to_represent_keeps_the_connection() {
    let config = ProxyConfig {
        tcp: TcpPolicy {
            drain: DrainPolicy::CloseAfter(Duration::MAX),
            idle_timeout: Some(Duration::MAX),
            ..config().tcp
        },
        ..config()
    };
    let mut f = fixture(config, &[ep(1)]);
    let id = f.open(1, f.t0);
    set_endpoints(&f.table, &[ep(2)]);
    f.engine.poll(&mut f.io, f.t0 + Duration::from_secs(1));
    assert!(f.engine.conn(id).is_some(), "no overflow, no close");
}

#[test]
fn half_close_orderings() {
    let mut f = fixture(config(), &[ep(1)]);
    let id = f.open(1, f.t0);
    let state = &mut f.engine.conn_mut(id).unwrap().state;
    // EOF from the client with bytes still to write: nothing yet.
    assert_eq!(state.read_eof(Direction::Upstream, true), Step::Continue);
    assert!(state.eof_seen(Direction::Upstream));
    assert_eq!(
        state.drained(Direction::Upstream),
        Step::Shutdown(Side::Backend)
    );
    assert_eq!(state.drained(Direction::Upstream), Step::Continue, "once");
    // Draining a direction without EOF does nothing.
    assert_eq!(state.drained(Direction::Downstream), Step::Continue);
    assert_eq!(
        state.read_eof(Direction::Downstream, false),
        Step::ShutdownAndFinish(Side::Client)
    );
}

#[test]
fn an_error_on_one_side_resets_the_other() {
    let mut f = fixture(config(), &[ep(1)]);
    let id = f.open(1, f.t0);
    f.io.take();
    f.engine.failed(&mut f.io, id, Side::Backend);
    assert_eq!(f.io.take(), vec![Cmd::Close(1, Some(Side::Client))]);
    assert_eq!(f.stats()[0].1.connections_active, 0);
}

#[test]
fn no_eligible_endpoint_refuses_and_a_removed_port_closes_its_listener() {
    let mut f = fixture(config(), &[ep(1)]);
    set_endpoints(&f.table, &[]);
    f.engine.poll(&mut f.io, f.t0);
    assert_eq!(f.io.take(), vec![Cmd::Unlisten(frontend())]);
    // A client the kernel had already handed over is refused.
    f.engine.accepted(&mut f.io, f.listener, 9, client(9), f.t0);
    assert_eq!(f.io.take(), vec![Cmd::Close(9, Some(Side::Client))]);
    assert_eq!(f.control.connections(), 0);
}

#[test]
fn at_the_flow_limit_the_oldest_unreplied_flow_makes_room() {
    let config = ProxyConfig {
        max_udp_flows: 2,
        max_udp_flows_per_client: 2,
        ..ProxyConfig::default()
    };
    let mut f = fixture(config, &[ep(1)]);
    let key = with_a_udp_service(&mut f);
    f.io.take();
    let listener = f.engine.listener_id(&key).unwrap();
    let snapshot = f.engine.udp_snapshot(f.t0);
    let open = |f: &mut Fixture, port: u16| {
        f.engine.flow_for(
            &mut f.io,
            &snapshot,
            listener,
            client(port),
            Destination::default(),
            f.t0,
        )
    };
    let a = open(&mut f, 1).unwrap();
    let b = open(&mut f, 2).unwrap();
    f.engine.flows_mut().replied(a, f.t0);
    let b_endpoint = f.engine.flows().get(b).unwrap().endpoint;
    // The third client's flow takes the place of the oldest one nothing came back on.
    let c = open(&mut f, 3).expect("room was made");
    assert_eq!(f.io.take(), vec![Cmd::CloseFlow(b_endpoint)]);
    assert!(f.engine.flows().get(b).is_none());
    assert!(f.engine.flows().get(a).is_some() && f.engine.flows().get(c).is_some());
    let dns = |f: &Fixture| {
        let stats = f.table.load().stats();
        stats
            .into_iter()
            .find(|s| s.service == "dns")
            .unwrap()
            .totals
    };
    assert_eq!(dns(&f).evicted, 1, "counted");
    // With every flow replied, there is nothing to evict: the datagram is dropped.
    f.engine.flows_mut().replied(c, f.t0);
    assert!(open(&mut f, 4).is_none());
    assert_eq!(f.engine.flows().len(), 2);
}

#[test]
fn one_client_address_holds_at_most_its_share_of_connections() {
    let config = ProxyConfig {
        max_connections: 8,
        max_connections_per_client: 2,
        ..ProxyConfig::default()
    };
    let mut f = fixture(config, &[ep(1)]);
    let first = f.open(1, f.t0);
    f.open(2, f.t0);
    f.io.take();
    // The third connection from the same address is reset, and counted limited.
    f.accept(3, f.t0);
    assert_eq!(f.io.take(), vec![Cmd::Close(3, Some(Side::Client))]);
    let limited = |f: &Fixture| f.table.load().stats()[0].totals.limited;
    assert_eq!(limited(&f), 1);
    assert_eq!(f.control.connections(), 2, "its budget unit went back");
    // Another address is served; and when a connection ends, the first address may again.
    f.engine.accepted(
        &mut f.io,
        f.listener,
        4,
        SocketAddr::from(([127, 0, 0, 3], 4)),
        f.t0,
    );
    assert_eq!(f.io.take(), vec![Cmd::Connect(4, ep(1))]);
    f.engine.close(&mut f.io, first, None);
    f.io.take();
    f.accept(5, f.t0);
    assert_eq!(f.io.take(), vec![Cmd::Connect(5, ep(1))]);
    assert_eq!(limited(&f), 1);
}

#[test]
fn over_budget_the_connections_idle_longest_make_room() {
    let config = ProxyConfig {
        max_connections: 32,
        max_connections_per_client: 32,
        tcp: TcpPolicy {
            connect_timeout: Duration::from_secs(10),
            ..config().tcp
        },
        ..config()
    };
    let mut f = fixture(config, &[ep(1)]);
    for port in 1..=32u16 {
        f.open(port, f.t0 + Duration::from_millis(u64::from(port)));
    }
    f.io.take();
    let evicted = |f: &Fixture| f.table.load().stats()[0].totals.evicted;
    // Every connection has been quiet for over a second: the two quiet longest (a
    // sixteenth of 32) make room, closed as by the idle timeout.
    f.accept(100, f.t0 + Duration::from_millis(1_500));
    assert_eq!(
        f.io.take(),
        vec![
            Cmd::Close(1, None),
            Cmd::Close(2, None),
            Cmd::Connect(100, ep(1))
        ]
    );
    assert_eq!(evicted(&f), 2);
    assert_eq!(f.control.connections(), 31);
    // The unit left over serves the next client; then connections active less than a second
    // ago are never evicted: the one after waits.
    f.accept(101, f.t0 + Duration::from_millis(1_500));
    assert_eq!(f.io.take(), vec![Cmd::Connect(101, ep(1))]);
    let active = f.t0 + Duration::from_millis(1_600);
    let ids: Vec<ConnId> = f.engine.connections().map(|(id, _)| id).collect();
    for id in ids {
        f.engine.conn_mut(id).unwrap().state.active(active);
    }
    f.accept(102, f.t0 + Duration::from_millis(2_000));
    assert_eq!(f.io.take(), vec![Cmd::Accepting(false)]);
    assert_eq!(f.engine.waiting_count(), 1);
    // A second after that activity, the tick evicts two (a sixteenth of 32) for the waiting
    // client; the connections still connecting (100 and 101) are never candidates.
    f.engine.poll(&mut f.io, active + Duration::from_secs(1));
    let cmds = f.io.take();
    let closed = |port: u16| (3..=32).contains(&port);
    assert!(
        matches!(
            cmds[..],
            [
                Cmd::Close(a, None),
                Cmd::Close(b, None),
                Cmd::Connect(102, _),
                Cmd::Accepting(true)
            ] if closed(a) && closed(b)
        ),
        "{cmds:?}"
    );
    assert_eq!(evicted(&f), 4);
    assert_eq!(f.engine.waiting_count(), 0);
    assert_eq!(f.control.connections(), 31);
}

/// A log writer keeping what is written, shared.
#[derive(Clone, Default)]
struct Log(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn bind_failures_are_logged_once_with_a_count_not_at_every_retry() {
    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let table = Arc::new(Table::default());
        let mut batch = Batch::new();
        for port in 8000..8100 {
            let name = format!("web-{port}");
            let svc = Service::new(name.clone())
                .address("127.0.0.1".parse().unwrap())
                .port(ServicePort::tcp(port));
            batch = batch
                .upsert(svc)
                .replace_endpoints(name, vec![Endpoint::new(ep(1))]);
        }
        table.apply(batch).unwrap();
        let control = Arc::new(Control::new(table.clone(), config(), 1));
        let mut engine = Engine::new(WorkerContext {
            index: 0,
            control: control.clone(),
        });
        let mut io = Recorder {
            listens_fail: true,
            ..Recorder::default()
        };
        let t0 = Instant::now();
        engine.start(&mut io, t0);
        // Ten retries, a second apart: each frontend is tried again, none logged again.
        for tick in 1..=10 {
            engine.poll(&mut io, t0 + TICK * tick);
        }
        let listens = io
            .take()
            .iter()
            .filter(|c| matches!(c, Cmd::Listen(_)))
            .count();
        assert_eq!(listens, 100 * 11, "every frontend is retried every second");
        assert_eq!(control.bind_errors().len(), 100);
        io.listens_fail = false;
        engine.poll(&mut io, t0 + TICK * 11);
        assert!(control.bind_errors().is_empty());
    });
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("cannot listen"))
        .collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(warnings[0].contains("frontends=100"), "{}", warnings[0]);
    let recovered: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("listening again"))
        .collect();
    assert_eq!(recovered.len(), 1, "{text}");
    assert!(recovered[0].contains("frontends=100"), "{}", recovered[0]);
}

fn steered_service(name: &str, addr: &str, port: ServicePort, endpoint: SocketAddr) -> Batch {
    let service = Service::new(name).address(addr.parse().unwrap()).port(port);
    Batch::new()
        .upsert(service)
        .replace_endpoints(name, vec![Endpoint::new(endpoint)])
}

fn udp_key(addr: &str) -> ServicePortKey {
    ServicePortKey::new(addr.parse().unwrap(), Protocol::Udp)
}

fn tcp_key(addr: &str) -> ServicePortKey {
    ServicePortKey::new(addr.parse().unwrap(), Protocol::Tcp)
}

/// What a transparent UDP listener reports of a datagram sent to `to`.
fn original(to: Option<SocketAddr>) -> Destination {
    Destination {
        local: None,
        original: to,
    }
}

fn steered() -> ProxyConfig {
    ProxyConfig {
        transparent_port: Some(10263),
        ..ProxyConfig::default()
    }
}

#[test]
fn steered_frontends_share_one_transparent_listener_per_family_and_protocol() {
    let mut f = fixture(steered(), &[ep(1)]);
    for (i, addr) in ["198.18.0.1", "198.18.0.2", "2001:db8::1"]
        .iter()
        .enumerate()
    {
        let batch = steered_service(&format!("s{i}"), addr, ServicePort::tcp(80), ep(2));
        f.table.apply(batch).unwrap();
    }
    f.engine.woken(&mut f.io, f.t0);
    f.engine.poll(&mut f.io, f.t0);
    let v4 = tcp_key("127.0.0.1:10263");
    let v6 = tcp_key("[::1]:10263");
    // The loopback frontend of the fixture keeps its own listener; the three service
    // addresses are served by two transparent listeners, opened once each.
    let mut listened = f.io.take();
    listened.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(listened, vec![Cmd::Listen(v4), Cmd::Listen(v6)]);
    assert!(f.engine.listener_id(&tcp_key("198.18.0.1:80")).is_none());
    // A client of 198.18.0.2:80 accepted by the transparent listener goes to that service.
    f.io.local = Some("198.18.0.2:80".parse().unwrap());
    let transparent = f.engine.listener_id(&v4).unwrap();
    f.engine
        .accepted(&mut f.io, transparent, 7, client(7), f.t0);
    assert_eq!(f.io.take(), vec![Cmd::Connect(7, ep(2))]);
    // A client whose destination is no frontend (straight to the transparent port) is reset.
    f.io.local = Some("127.0.0.1:10263".parse().unwrap());
    f.engine
        .accepted(&mut f.io, transparent, 8, client(8), f.t0);
    assert_eq!(f.io.take(), vec![Cmd::Close(8, Some(Side::Client))]);
    // The transparent listener stays while it serves one frontend, and closes with the last.
    f.table.apply(Batch::new().remove("s0")).unwrap();
    f.engine.poll(&mut f.io, f.t0);
    assert_eq!(f.io.take(), vec![]);
    f.table
        .apply(Batch::new().replace_endpoints("s1", vec![]))
        .unwrap();
    f.engine.poll(&mut f.io, f.t0);
    assert_eq!(f.io.take(), vec![Cmd::Unlisten(v4)]);
    f.table.apply(Batch::new().remove("s2")).unwrap();
    f.engine.poll(&mut f.io, f.t0);
    assert_eq!(f.io.take(), vec![Cmd::Unlisten(v6)]);
}

#[test]
fn a_steered_udp_frontend_has_a_listener_to_reply_from_while_it_has_flows() {
    let mut f = fixture(steered(), &[ep(1)]);
    let dns_ep = SocketAddr::from(([127, 0, 2, 1], 53));
    let batch = steered_service("dns", "198.18.0.53", ServicePort::udp(53), dns_ep);
    f.table.apply(batch).unwrap();
    f.engine.poll(&mut f.io, f.t0);
    let transparent = udp_key("127.0.0.1:10263");
    assert_eq!(f.io.take(), vec![Cmd::Listen(transparent)]);
    let listener = f.engine.listener_id(&transparent).unwrap();
    let snapshot = f.engine.udp_snapshot(f.t0);
    let dns: SocketAddr = "198.18.0.53:53".parse().unwrap();
    let open = |f: &mut Fixture, port: u16, to: Option<SocketAddr>| {
        f.engine.flow_for(
            &mut f.io,
            &snapshot,
            listener,
            client(port),
            original(to),
            f.t0,
        )
    };
    // Without its original destination a datagram cannot be mapped; nor to a non-frontend.
    assert!(open(&mut f, 1, None).is_none());
    assert!(open(&mut f, 1, Some("198.18.0.54:53".parse().unwrap())).is_none());
    assert_eq!(f.io.take(), vec![]);
    // The first flow opens the frontend's listener (replies leave from 198.18.0.53:53).
    let a = open(&mut f, 1, Some(dns)).unwrap();
    let b = open(&mut f, 2, Some(dns)).unwrap();
    assert_ne!(a, b);
    assert_eq!(f.io.take(), vec![Cmd::Listen(udp_key("198.18.0.53:53"))]);
    let flow = f.engine.flows().get(a).unwrap();
    assert_eq!(
        (flow.listener, flow.key.local, flow.endpoint),
        (udp_key("198.18.0.53:53"), dns, dns_ep)
    );
    assert_eq!(open(&mut f, 1, Some(dns)), Some(a), "the same flow");
    // Once the flows have expired, the next tick closes it.
    let later = f.t0 + UNREPLIED_TIMEOUT + TICK * 2;
    f.engine.poll(&mut f.io, later);
    let mut cmds = f.io.take();
    cmds.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(
        cmds,
        vec![
            Cmd::CloseFlow(dns_ep),
            Cmd::CloseFlow(dns_ep),
            Cmd::Unlisten(udp_key("198.18.0.53:53"))
        ]
    );
}

/// Adds to the fixture a UDP service `dns` with three endpoints, applied; its frontend's key.
fn with_a_udp_service(f: &mut Fixture) -> ServicePortKey {
    let dns = Service::new("dns")
        .address("127.0.0.1".parse().unwrap())
        .port(ServicePort::udp(53));
    let to = |i: u8| Endpoint::new(SocketAddr::from(([127, 0, 2, i], 53)));
    f.table
        .apply(
            Batch::new()
                .upsert(dns)
                .replace_endpoints("dns", vec![to(1), to(2), to(3)]),
        )
        .unwrap();
    f.engine.poll(&mut f.io, f.t0);
    ServicePortKey::new("127.0.0.1:53".parse().unwrap(), Protocol::Udp)
}

/// The fixture's TCP service and a UDP one with one flow open; the UDP frontend's key and
/// the flow's endpoint.
fn with_a_udp_flow(f: &mut Fixture, client_port: u16) -> (ServicePortKey, SocketAddr) {
    let key = with_a_udp_service(f);
    let listener = f.engine.listener_id(&key).unwrap();
    let snapshot = f.engine.udp_snapshot(f.t0);
    f.engine
        .flow_for(
            &mut f.io,
            &snapshot,
            listener,
            client(client_port),
            Destination::default(),
            f.t0,
        )
        .expect("a flow");
    f.io.take();
    let endpoint = f.engine.flows().iter().next().unwrap().1.endpoint;
    (key, endpoint)
}

#[test]
fn a_handover_exports_once_udp_is_quiet_and_a_retired_worker_lets_go_of_its_sockets() {
    let mut f = fixture(config(), &[ep(1)]);
    let (udp, flow) = with_a_udp_flow(&mut f, 7);

    // Exporting: receiving stops on the listener and the flow, and the sockets are deposited
    // only once no receive is in flight.
    f.io.receiving_in_flight = true;
    f.control.set_phase(handover::Phase::Exporting);
    f.engine.poll(&mut f.io, f.t0);
    assert_eq!(
        f.io.take(),
        vec![Cmd::Receiving(false), Cmd::Receiving(false)]
    );
    assert!(f.control.wait_exported(Duration::ZERO).is_none());
    f.io.receiving_in_flight = false;
    f.engine.poll(&mut f.io, f.t0 + Duration::from_millis(300));
    let exported = f.control.wait_exported(Duration::ZERO).expect("deposited");
    let mut keys: Vec<ServicePortKey> = exported[0].listeners.iter().map(|(k, _)| *k).collect();
    keys.sort();
    assert_eq!(keys, vec![udp, frontend()]);
    let (handed, _) = &exported[0].flows[0];
    assert_eq!(handed.key.client, client(7));
    assert_eq!(handed.endpoint, flow);
    assert_eq!(handed.idle, Duration::from_millis(300));

    // Abandoned: receiving resumes. Exported again, then retired: accepting stops, and at
    // shutdown the sockets are let go of, not closed (no shutdown(2) of another's socket).
    f.control.set_phase(handover::Phase::Serving);
    f.engine.poll(&mut f.io, f.t0);
    assert_eq!(
        f.io.take(),
        vec![Cmd::Receiving(true), Cmd::Receiving(true)]
    );
    f.control.set_phase(handover::Phase::Exporting);
    f.engine.poll(&mut f.io, f.t0);
    assert!(f.control.wait_exported(Duration::ZERO).is_some());
    f.control.set_phase(handover::Phase::Retired);
    f.engine.poll(&mut f.io, f.t0);
    assert!(!f.engine.may_accept());
    assert!(
        f.control.wait_retired(Duration::ZERO),
        "retired, nothing in flight"
    );
    f.io.take();
    f.control.begin_shutdown(Some(f.t0));
    f.engine.poll(&mut f.io, f.t0);
    let mut released = f.io.take();
    released.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(
        released,
        vec![
            Cmd::Release(udp),
            Cmd::Release(frontend()),
            Cmd::ReleaseFlow(flow)
        ]
    );
}

#[test]
fn an_inheriting_worker_adopts_the_listeners_and_the_flows_it_still_serves() {
    let mut old = fixture(config(), &[ep(1)]);
    let (udp, endpoint) = with_a_udp_flow(&mut old, 7);
    old.control.set_phase(handover::Phase::Exporting);
    old.engine.poll(&mut old.io, old.t0);
    let mut exported = old
        .control
        .wait_exported(Duration::ZERO)
        .expect("deposited");
    // A flow to an endpoint the new table does not have is not adopted.
    let mut gone = exported[0].flows[0].0;
    gone.key.client = client(8);
    gone.endpoint = SocketAddr::from(([127, 0, 2, 9], 53));
    exported[0].flows.push((gone, some_fd().unwrap()));

    let control = Arc::new(Control::new(old.table.clone(), config(), 1));
    control.inherit(exported);
    control.set_phase(handover::Phase::Inheriting);
    let mut engine = Engine::new(WorkerContext {
        index: 0,
        control: control.clone(),
    });
    let mut io = Recorder::default();
    engine.start(&mut io, old.t0);
    // Adopted, neither accepting nor receiving until the old process has retired.
    let mut cmds = io.take();
    cmds.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(
        cmds,
        vec![
            Cmd::Adopt(udp, false),
            Cmd::Adopt(frontend(), false),
            Cmd::AdoptFlow(endpoint, false),
            Cmd::Receiving(false),
        ]
    );
    assert!(!engine.may_accept());
    assert_eq!(engine.flows().len(), 1);
    let dns = old.table.load().stats();
    let dns = &dns.iter().find(|s| s.service == "dns").unwrap().totals;
    assert_eq!(
        (dns.connections_total, dns.connections_active),
        (1, 2),
        "an adopted flow is not counted as opened again; here both processes hold it"
    );
    let (_, flow) = engine.flows().iter().next().unwrap();
    assert_eq!((flow.key.client, flow.endpoint), (client(7), endpoint));
    assert_eq!(
        control.drop_inherited(),
        0,
        "every inherited socket was taken or dropped"
    );

    control.set_phase(handover::Phase::Serving);
    engine.poll(&mut io, old.t0);
    let mut cmds = io.take();
    cmds.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(
        cmds,
        vec![
            Cmd::Accepting(true),
            Cmd::Receiving(true),
            Cmd::Receiving(true)
        ]
    );
    assert!(engine.may_accept());
}

#[test]
fn a_retired_worker_opens_no_listener_and_once_resumed_opens_what_it_left() {
    let mut f = fixture(config(), &[ep(1)]);
    f.io.receiving_in_flight = true;
    f.control.set_phase(handover::Phase::Retired);
    f.engine.poll(&mut f.io, f.t0);
    assert_eq!(f.io.take(), vec![Cmd::Accepting(false)]);
    assert!(
        !f.control.wait_retired(Duration::ZERO),
        "not retired while an accept is in flight"
    );
    f.io.receiving_in_flight = false;
    f.engine.poll(&mut f.io, f.t0);
    assert!(f.control.wait_retired(Duration::ZERO));

    // A frontend published now gets no listener: the process serving the sockets would not
    // know it, and its clients would be lost when this one exits.
    let api = Service::new("api")
        .address("127.0.0.1".parse().unwrap())
        .port(ServicePort::tcp(8081));
    f.table
        .apply(
            Batch::new()
                .upsert(api)
                .replace_endpoints("api", vec![Endpoint::new(ep(1))]),
        )
        .unwrap();
    f.engine.poll(&mut f.io, f.t0);
    assert_eq!(f.io.take(), vec![]);

    // The other process did not take over after all: this one serves again, everything.
    f.control.set_phase(handover::Phase::Serving);
    f.engine.poll(&mut f.io, f.t0);
    let api_key = ServicePortKey::new("127.0.0.1:8081".parse().unwrap(), Protocol::Tcp);
    assert_eq!(
        f.io.take(),
        vec![Cmd::Accepting(true), Cmd::Listen(api_key)]
    );
    assert!(f.engine.may_accept());
}
