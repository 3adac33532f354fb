//! The behaviour suite: every test takes the backend as a parameter, and each backend's test
//! file instantiates the whole suite with [`suite!`], so all backends are held to the same
//! behaviour.

#![allow(dead_code)]

pub mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use svcproxy::{BackendKind, Conditions, Protocol, SessionAffinity, Table};

use harness::*;

/// Instantiates every behaviour test for `$backend`, using loopback addresses 127.`$suite`.x.y,
/// optionally with `$adjust` applied to every proxy's settings (e.g. another forwarding mode).
#[macro_export]
macro_rules! suite {
    ($backend:expr, $suite:expr) => {
        $crate::suite!($backend, $suite, |_| {});
    };
    ($backend:expr, $suite:expr, $adjust:expr) => {
        $crate::suite!(@tests $backend, $suite, $adjust;
            round_robin_reaches_every_endpoint_in_turn,
            session_affinity_sticks_and_switching_it_off_spreads_again,
            client_half_close_still_gets_the_full_reply,
            backend_half_close_keeps_the_other_direction,
            backend_reset_resets_the_client,
            client_reset_resets_the_backend,
            backend_dying_mid_stream_resets_the_client,
            refused_endpoint_moves_to_the_next,
            no_endpoints_refuses_at_once,
            endpoint_changes_under_load_fail_no_connection,
            udp_replies_come_from_the_service_address,
            udp_wildcard_listener_replies_from_the_address_used,
            udp_flow_to_removed_endpoint_moves_on_next_datagram,
            udp_reply_in_flight_from_a_removed_endpoint_still_arrives,
            udp_large_datagrams_pass_intact,
            shutdown_closes_everything_and_leaks_no_descriptor,
            idle_connections_are_closed,
            unanswered_connect_times_out_to_the_next_endpoint,
            connection_limit_holds_clients_until_one_closes,
            drain_policy_keeps_or_closes_connections_to_removed_endpoints,
            idle_udp_flows_expire,
            descriptor_exhaustion_backs_off_and_recovers,
            ipv6_tcp_and_udp,
            per_service_connection_limit_refuses_beyond_it,
            load_balancer_source_ranges_refuse_clients_outside_them,
            random_payloads_arrive_intact,
            udp_datagrams_arrive_intact,
            a_backend_that_never_reads_holds_back_its_client,
            a_client_that_never_reads_holds_back_its_backend,
            table_swaps_every_millisecond_fail_no_connection,
            a_worker_that_panics_is_restarted_then_reported_down,
        );
    };
    (@tests $backend:expr, $suite:expr, $adjust:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $crate::behaviour::harness::adjust_configs($adjust);
                $crate::behaviour::$name($backend, $suite);
            }
        )*
    };
}

fn table() -> Arc<Table> {
    Arc::new(Table::default())
}

/// A proxy with one one-port service, `name`, on a fresh loopback address, in front of
/// `endpoints`: the proxy and the service's address.
fn serve(
    backend: BackendKind,
    suite: u8,
    config: svcproxy::ProxyConfig,
    name: &str,
    protocol: Protocol,
    port: u16,
    endpoints: Vec<svcproxy::Endpoint>,
) -> (svcproxy::Proxy, SocketAddr) {
    let proxy = start(backend, &table(), config);
    let ip = service_ip(suite);
    publish(&proxy, service(name, ip, port, protocol), endpoints);
    (proxy, SocketAddr::new(ip, port))
}

pub fn round_robin_reaches_every_endpoint_in_turn(backend: BackendKind, suite: u8) {
    let _g = shared();
    let servers: Vec<TcpServer> = (0..3).map(|_| TcpServer::identify()).collect();
    let (proxy, vip) = serve(
        backend,
        suite,
        config(),
        "rr",
        Protocol::Tcp,
        80,
        servers.iter().map(|s| s.endpoint()).collect(),
    );
    let mut order: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    order.sort();
    for round in 0..3 {
        for want in &order {
            assert_eq!(who_answers(vip).unwrap(), *want, "round {round}");
        }
    }
    let stats = proxy.stats();
    assert_eq!(stats[0].totals.connections_total, 9);
    assert!(
        stats[0]
            .endpoints
            .iter()
            .all(|(_, v)| v.connections_total == 3)
    );
}

pub fn session_affinity_sticks_and_switching_it_off_spreads_again(backend: BackendKind, suite: u8) {
    let _g = shared();
    let servers: Vec<TcpServer> = (0..3).map(|_| TcpServer::identify()).collect();
    let endpoints = || servers.iter().map(|s| s.endpoint()).collect::<Vec<_>>();
    let table = table();
    let proxy = start(backend, &table, config());
    let ip = service_ip(suite);
    let vip = SocketAddr::new(ip, 80);
    let sticky = service("sticky", ip, 80, Protocol::Tcp).affinity(SessionAffinity::ClientIp {
        timeout: Duration::from_secs(600),
    });
    publish(&proxy, sticky, endpoints());
    let a: IpAddr = [127, 0, 0, 2].into();
    let b: IpAddr = [127, 0, 0, 3].into();
    let first = who(&connect_from(a, vip).unwrap()).unwrap();
    let mut from_b = BTreeSet::new();
    for _ in 0..6 {
        assert_eq!(who(&connect_from(a, vip).unwrap()).unwrap(), first);
        from_b.insert(who(&connect_from(b, vip).unwrap()).unwrap());
    }
    assert_eq!(from_b.len(), 1, "client b sticks to one endpoint too");
    // Affinity off: the same client spreads over every endpoint again.
    publish(
        &proxy,
        service("sticky", ip, 80, Protocol::Tcp),
        endpoints(),
    );
    let seen: BTreeSet<SocketAddr> = (0..6)
        .map(|_| who(&connect_from(a, vip).unwrap()).unwrap())
        .collect();
    assert_eq!(seen.len(), 3);
}

pub fn client_half_close_still_gets_the_full_reply(backend: BackendKind, suite: u8) {
    let _g = shared();
    // The backend reads the whole request, then answers with 4 MiB derived from it.
    let server = TcpServer::spawn(|mut s| {
        let mut request = Vec::new();
        if s.read_to_end(&mut request).is_err() {
            return;
        }
        let reply: Vec<u8> = (0..4 << 20)
            .map(|i: usize| request[i % request.len()] ^ (i as u8))
            .collect();
        let _ = s.write_all(&reply);
    });
    let (_proxy, vip) = serve(
        backend,
        suite,
        config(),
        "half",
        Protocol::Tcp,
        80,
        vec![server.endpoint()],
    );
    let mut c = connect(vip).unwrap();
    let request: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    c.write_all(&request).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    c.read_to_end(&mut reply).unwrap();
    let want: Vec<u8> = (0..4 << 20)
        .map(|i: usize| request[i % request.len()] ^ (i as u8))
        .collect();
    assert_eq!(reply.len(), want.len());
    assert!(reply == want, "reply corrupted");
}

pub fn backend_half_close_keeps_the_other_direction(backend: BackendKind, suite: u8) {
    let _g = shared();
    let received = Arc::new(AtomicUsize::new(0));
    let server = {
        let received = received.clone();
        TcpServer::spawn(move |mut s| {
            let _ = s.write_all(b"greeting");
            let _ = s.shutdown(Shutdown::Write);
            let mut all = Vec::new();
            if s.read_to_end(&mut all).is_ok() {
                received.store(all.len(), Ordering::SeqCst);
            }
        })
    };
    let (_proxy, vip) = serve(
        backend,
        suite,
        config(),
        "half2",
        Protocol::Tcp,
        80,
        vec![server.endpoint()],
    );
    let mut c = connect(vip).unwrap();
    let mut greeting = Vec::new();
    c.read_to_end(&mut greeting).unwrap();
    assert_eq!(
        greeting, b"greeting",
        "the backend's FIN reaches the client"
    );
    c.write_all(&vec![7u8; 300_000]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    drop(server); // joins the handler: it has read everything by then
    assert_eq!(received.load(Ordering::SeqCst), 300_000);
}

fn reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
}

use std::net::TcpStream;

pub fn backend_reset_resets_the_client(backend: BackendKind, suite: u8) {
    let _g = shared();
    let server = TcpServer::spawn(|mut s| {
        let mut buf = [0u8; 5];
        if s.read_exact(&mut buf).is_ok() {
            reset(s);
        }
    });
    let (_proxy, vip) = serve(
        backend,
        suite,
        config(),
        "rst",
        Protocol::Tcp,
        80,
        vec![server.endpoint()],
    );
    let mut c = connect(vip).unwrap();
    c.write_all(b"hello").unwrap();
    let mut buf = [0u8; 16];
    let err = c.read(&mut buf).expect_err("the client must see the reset");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
}

pub fn client_reset_resets_the_backend(backend: BackendKind, suite: u8) {
    let _g = shared();
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let server = TcpServer::spawn(move |mut s| {
        let mut buf = [0u8; 16];
        let _ = s.read_exact(&mut buf[..5]);
        let tx = tx.lock().unwrap().clone();
        tx.send(None).unwrap();
        let kind = loop {
            match s.read(&mut buf) {
                Ok(0) => break ErrorKind::UnexpectedEof,
                Ok(_) => continue,
                Err(e) => break e.kind(),
            }
        };
        tx.send(Some(kind)).unwrap();
    });
    let (_proxy, vip) = serve(
        backend,
        suite,
        config(),
        "rst2",
        Protocol::Tcp,
        80,
        vec![server.endpoint()],
    );
    let mut c = connect(vip).unwrap();
    c.write_all(b"hello").unwrap();
    // The backend has the bytes: the connection is through. Now reset it.
    assert_eq!(rx.recv_timeout(IO_TIMEOUT).unwrap(), None);
    reset(c);
    let seen = rx.recv_timeout(IO_TIMEOUT).unwrap();
    assert_eq!(seen, Some(ErrorKind::ConnectionReset));
}

pub fn backend_dying_mid_stream_resets_the_client(backend: BackendKind, suite: u8) {
    let _g = shared();
    // The backend takes 64 KiB of a long upload and dies with unread data (its kernel sends
    // a reset, as when a process is killed).
    let server = TcpServer::spawn(|mut s| {
        let mut buf = vec![0u8; 64 << 10];
        let _ = s.read_exact(&mut buf);
        std::thread::sleep(Duration::from_millis(20));
        drop(s);
    });
    let (_proxy, vip) = serve(
        backend,
        suite,
        config(),
        "dies",
        Protocol::Tcp,
        80,
        vec![server.endpoint()],
    );
    let mut c = connect(vip).unwrap();
    let chunk = vec![1u8; 64 << 10];
    let mut failed = None;
    for _ in 0..1024 {
        if let Err(e) = c.write_all(&chunk) {
            failed = Some(e.kind());
            break;
        }
    }
    if failed.is_none() {
        let mut buf = [0u8; 16];
        failed = c.read(&mut buf).err().map(|e| e.kind());
    }
    let kind = failed.expect("a 64 MiB upload to a dead backend must fail, not succeed");
    assert!(
        matches!(kind, ErrorKind::ConnectionReset | ErrorKind::BrokenPipe),
        "client saw {kind:?}"
    );
}

pub fn refused_endpoint_moves_to_the_next(backend: BackendKind, suite: u8) {
    let _g = shared();
    let live = TcpServer::identify();
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let endpoints = vec![live.endpoint(), svcproxy::Endpoint::new(dead)];
    let (proxy, vip) = serve(
        backend,
        suite,
        config(),
        "retry",
        Protocol::Tcp,
        80,
        endpoints,
    );
    for _ in 0..6 {
        assert_eq!(who_answers(vip).unwrap(), live.addr);
    }
    let stats = &proxy.stats()[0];
    let dead_stats = stats.endpoints.iter().find(|(a, _)| *a == dead).unwrap().1;
    assert_eq!(
        dead_stats.connect_errors, 3,
        "round robin sent every other connection to it first"
    );
    assert_eq!(dead_stats.connections_active, 0);
}

pub fn no_endpoints_refuses_at_once(backend: BackendKind, suite: u8) {
    let _g = shared();
    let server = TcpServer::identify();
    let (proxy, vip) = serve(backend, suite, config(), "empty", Protocol::Tcp, 80, vec![]);
    let refused = |what: &str| {
        let err = connect(vip).expect_err(what);
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{what}");
    };
    refused("no endpoints");
    set_endpoints(
        &proxy,
        "empty",
        vec![server.endpoint().conditions(Conditions::NOT_READY)],
    );
    refused("no ready endpoint");
    set_endpoints(&proxy, "empty", vec![server.endpoint()]);
    assert_eq!(who_answers(vip).unwrap(), server.addr);
    set_endpoints(&proxy, "empty", vec![]);
    refused("endpoints removed");
    proxy
        .table()
        .apply(svcproxy::Batch::new().remove("empty"))
        .unwrap();
    proxy.sync(IO_TIMEOUT).unwrap();
    refused("service removed");
}

pub fn endpoint_changes_under_load_fail_no_connection(backend: BackendKind, suite: u8) {
    let _g = shared();
    let servers: Vec<TcpServer> = (0..4).map(|_| TcpServer::identify()).collect();
    let endpoints = |which: &[usize]| {
        which
            .iter()
            .map(|&i| servers[i].endpoint())
            .collect::<Vec<_>>()
    };
    let (proxy, vip) = serve(
        backend,
        suite,
        config(),
        "churn",
        Protocol::Tcp,
        80,
        endpoints(&[0, 1, 2]),
    );
    const CLIENTS: usize = 200;
    let exchange = move |i: usize| {
        let mut s = connect(vip)?;
        let msg = format!("client {i}\n");
        who(&s)?;
        s.write_all(msg.as_bytes())?;
        s.shutdown(Shutdown::Write)?;
        let mut echo = String::new();
        s.read_to_string(&mut echo)?;
        assert_eq!(echo, msg);
        Ok(())
    };
    // Change the endpoint set while they run; every set keeps live endpoints only.
    let sets: [&[usize]; 4] = [&[0, 1, 2, 3], &[1, 2, 3], &[2, 3, 0], &[0, 1, 2]];
    let (failures, changes) = exchanges_during_changes(CLIENTS, exchange, |n| {
        if n >= 400 {
            return false;
        }
        set_endpoints(&proxy, "churn", endpoints(sets[n % sets.len()]));
        true
    });
    assert!(
        failures.is_empty(),
        "{} of {CLIENTS} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(changes >= 2, "the table changed while clients connected");
}

pub fn udp_replies_come_from_the_service_address(backend: BackendKind, suite: u8) {
    let _g = shared();
    let servers: Vec<UdpServer> = (0..2).map(|_| UdpServer::echo()).collect();
    let (proxy, vip) = serve(
        backend,
        suite,
        config(),
        "dns",
        Protocol::Udp,
        53,
        servers.iter().map(|s| s.endpoint()).collect(),
    );
    // Each client is a flow; flows go round robin. A connected client socket only accepts
    // datagrams from the service address, so every reply proves reverse translation.
    let mut per_backend = BTreeMap::new();
    for i in 0..4 {
        let client = udp_client(vip);
        for j in 0..3 {
            let msg = format!("q{i}.{j}");
            let (from, echo) = udp_ask(&client, msg.as_bytes()).unwrap();
            assert_eq!(echo, msg.as_bytes());
            *per_backend.entry(from).or_insert(0) += 1;
        }
    }
    assert_eq!(per_backend.len(), 2);
    assert!(per_backend.values().all(|&n| n == 6), "{per_backend:?}");
    // Counters are updated after each send returns, so the last may trail the reply.
    eventually("datagram counters", || {
        let totals = proxy.stats()[0].totals;
        (
            totals.datagrams_in,
            totals.datagrams_out,
            totals.connections_total,
        ) == (12, 12, 4)
    });
}

pub fn udp_wildcard_listener_replies_from_the_address_used(backend: BackendKind, suite: u8) {
    let _g = shared();
    let server = UdpServer::echo();
    let table = table();
    let proxy = start(backend, &table, config());
    let port = free_port(Protocol::Udp);
    let any: IpAddr = [0, 0, 0, 0].into();
    publish(
        &proxy,
        service("any", any, port, Protocol::Udp),
        vec![server.endpoint()],
    );
    for _ in 0..2 {
        let target = SocketAddr::new(service_ip(suite), port);
        let client = udp_client(target);
        let (from, echo) = udp_ask(&client, b"ping").unwrap();
        assert_eq!((from, echo.as_slice()), (server.addr, &b"ping"[..]));
    }
}

pub fn udp_flow_to_removed_endpoint_moves_on_next_datagram(backend: BackendKind, suite: u8) {
    let _g = shared();
    let servers: Vec<UdpServer> = (0..2).map(|_| UdpServer::echo()).collect();
    let (proxy, vip) = serve(
        backend,
        suite,
        config(),
        "move",
        Protocol::Udp,
        53,
        servers.iter().map(|s| s.endpoint()).collect(),
    );
    let client = udp_client(vip);
    let (first, _) = udp_ask(&client, b"a").unwrap();
    assert_eq!(udp_ask(&client, b"b").unwrap().0, first, "the flow sticks");
    let other: Vec<_> = servers
        .iter()
        .filter(|s| s.addr != first)
        .map(|s| s.endpoint())
        .collect();
    set_endpoints(&proxy, "move", other);
    let (second, echo) = udp_ask(&client, b"c").unwrap();
    assert_ne!(second, first, "same source port, new endpoint");
    assert_eq!(echo, b"c");
}

pub fn udp_reply_in_flight_from_a_removed_endpoint_still_arrives(backend: BackendKind, suite: u8) {
    let _g = shared();
    // A backend that answers only when the test says so.
    let late = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    late.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let next = UdpServer::echo();
    let (proxy, vip) = serve(
        backend,
        suite,
        config(),
        "late",
        Protocol::Udp,
        53,
        vec![svcproxy::Endpoint::new(late.local_addr().unwrap())],
    );
    let client = udp_client(vip);
    client.send(b"question").unwrap();
    let mut buf = [0u8; 64];
    let (n, flow_socket) = late.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"question");
    // The endpoint goes away while its answer is on its way.
    set_endpoints(&proxy, "late", vec![next.endpoint()]);
    late.send_to(b"answer", flow_socket).unwrap();
    let n = client
        .recv(&mut buf)
        .expect("the reply in flight reaches the client");
    assert_eq!(&buf[..n], b"answer");
    // The client's next datagram goes to the live endpoint.
    let (to, echo) = udp_ask(&client, b"again").unwrap();
    assert_eq!((to, echo.as_slice()), (next.addr, &b"again"[..]));
}

pub fn udp_large_datagrams_pass_intact(backend: BackendKind, suite: u8) {
    let _g = shared();
    let server = UdpServer::echo();
    let (_proxy, vip) = serve(
        backend,
        suite,
        config(),
        "big",
        Protocol::Udp,
        53,
        vec![server.endpoint()],
    );
    let client = udp_client(vip);
    for size in [2_000usize, 20_000, 60 << 10] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 31 % 253) as u8).collect();
        let (_, echo) = udp_ask(&client, &payload).unwrap();
        assert_eq!(echo.len(), size);
        assert!(echo == payload, "{size}-byte datagram corrupted");
    }
}

pub fn shutdown_closes_everything_and_leaks_no_descriptor(backend: BackendKind, suite: u8) {
    let _g = exclusive();
    let before = open_fds();
    let tcp = TcpServer::identify();
    let udp = UdpServer::echo();
    let (proxy, vip) = serve(
        backend,
        suite,
        config(),
        "t",
        Protocol::Tcp,
        80,
        vec![tcp.endpoint()],
    );
    let ip = vip.ip();
    publish(
        &proxy,
        service("u", ip, 53, Protocol::Udp),
        vec![udp.endpoint()],
    );
    // Traffic of each kind, and a connection left open across the shutdown.
    let open = connect(vip).unwrap();
    assert_eq!(who(&open).unwrap(), tcp.addr);
    let client = udp_client(SocketAddr::new(ip, 53));
    udp_ask(&client, b"x").unwrap();
    assert_eq!(proxy.connections(), 1);
    proxy.shutdown(Duration::from_millis(200)).unwrap();
    // The open connection was closed by the deadline: the client sees the end.
    let mut rest = Vec::new();
    let mut open = open;
    let _ = open.read_to_end(&mut rest);
    drop(open);
    drop(client);
    // Nothing listens any more.
    let err = connect(vip).expect_err("listener closed");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    // The backends join their threads when dropped: then only the proxy could hold anything.
    drop((tcp, udp));
    assert_eq!(open_fds(), before, "descriptors leaked");
}

pub fn idle_connections_are_closed(backend: BackendKind, suite: u8) {
    let _g = shared();
    let server = TcpServer::identify();
    let mut config = config();
    config.tcp.idle_timeout = Some(Duration::from_millis(300));
    let (proxy, vip) = serve(
        backend,
        suite,
        config,
        "idle",
        Protocol::Tcp,
        80,
        vec![server.endpoint()],
    );
    let mut c = connect(vip).unwrap();
    assert_eq!(who(&c).unwrap(), server.addr);
    // Activity keeps it open...
    for _ in 0..3 {
        c.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
    }
    // ...silence closes it: the client sees the end of the stream.
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    eventually("connection closed", || proxy.connections() == 0);
}

/// A listener that accepts nothing: once its queue is full, SYNs to it go unanswered.
fn black_hole() -> (socket2::Socket, Vec<TcpStream>, SocketAddr) {
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    l.listen(0).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    // Fill the accept queue (backlog 0 holds one); further handshakes are dropped.
    let mut fillers = Vec::new();
    for _ in 0..2 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        if s.connect_timeout(&addr.into(), Duration::from_millis(200))
            .is_ok()
        {
            fillers.push(s.into());
        }
    }
    (l, fillers, addr)
}

pub fn unanswered_connect_times_out_to_the_next_endpoint(backend: BackendKind, suite: u8) {
    let _g = shared();
    let live = TcpServer::identify();
    let (_hole, _fillers, hole) = black_hole();
    let mut config = config();
    config.tcp.connect_timeout = Duration::from_millis(100);
    let endpoints = vec![live.endpoint(), svcproxy::Endpoint::new(hole)];
    let (proxy, vip) = serve(backend, suite, config, "hole", Protocol::Tcp, 80, endpoints);
    for _ in 0..4 {
        assert_eq!(who_answers(vip).unwrap(), live.addr);
    }
    let stats = &proxy.stats()[0];
    let hole_stats = stats.endpoints.iter().find(|(a, _)| *a == hole).unwrap().1;
    assert_eq!(
        hole_stats.connect_errors, 2,
        "every other connection tried it and timed out"
    );
}

pub fn connection_limit_holds_clients_until_one_closes(backend: BackendKind, suite: u8) {
    let _g = shared();
    let server = TcpServer::identify();
    let mut config = config();
    config.max_connections = 2;
    // Every client here has one address: let it have the whole limit.
    config.max_connections_per_client = 2;
    let (proxy, vip) = serve(
        backend,
        suite,
        config,
        "limit",
        Protocol::Tcp,
        80,
        vec![server.endpoint()],
    );
    let first = connect(vip).unwrap();
    let second = connect(vip).unwrap();
    assert_eq!(who(&first).unwrap(), server.addr);
    assert_eq!(who(&second).unwrap(), server.addr);
    // The third waits in the accept queue: connected, but not served.
    let third = connect(vip).unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 1];
    let waiting = (&third)
        .read(&mut b)
        .expect_err("not served while two are open");
    assert!(
        matches!(waiting.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{waiting}"
    );
    assert_eq!(proxy.connections(), 2);
    drop(first);
    third.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&third), &mut line).unwrap();
    let served: SocketAddr = line.trim().parse().unwrap();
    assert_eq!(served, server.addr);
}

pub fn drain_policy_keeps_or_closes_connections_to_removed_endpoints(
    backend: BackendKind,
    suite: u8,
) {
    let _g = shared();
    let servers: Vec<TcpServer> = (0..2).map(|_| TcpServer::identify()).collect();
    let mut order: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    order.sort();
    for drain in [
        svcproxy::DrainPolicy::Keep,
        svcproxy::DrainPolicy::CloseAfter(Duration::from_millis(100)),
    ] {
        let table = table();
        let mut config = config();
        config.tcp.drain = drain;
        let proxy = start(backend, &table, config);
        let ip = service_ip(suite);
        let endpoints = || servers.iter().map(|s| s.endpoint()).collect::<Vec<_>>();
        publish(&proxy, service("drain", ip, 80, Protocol::Tcp), endpoints());
        let mut c = connect(SocketAddr::new(ip, 80)).unwrap();
        assert_eq!(who(&c).unwrap(), order[0]);
        let remaining = vec![svcproxy::Endpoint::new(order[1])];
        set_endpoints(&proxy, "drain", remaining);
        match drain {
            svcproxy::DrainPolicy::Keep => {
                c.write_all(b"still here").unwrap();
                let mut b = [0u8; 10];
                c.read_exact(&mut b).unwrap();
                assert_eq!(&b, b"still here");
            }
            svcproxy::DrainPolicy::CloseAfter(_) => {
                let mut rest = Vec::new();
                c.read_to_end(&mut rest).unwrap();
                assert!(rest.is_empty(), "closed after the grace period");
            }
        }
        // New connections go to the remaining endpoint either way.
        assert_eq!(who_answers(SocketAddr::new(ip, 80)).unwrap(), order[1]);
    }
}

pub fn idle_udp_flows_expire(backend: BackendKind, suite: u8) {
    let _g = shared();
    let server = UdpServer::echo();
    let mut config = config();
    config.udp_idle_timeout = Duration::from_millis(100);
    let (proxy, vip) = serve(
        backend,
        suite,
        config,
        "exp",
        Protocol::Udp,
        53,
        vec![server.endpoint()],
    );
    let client = udp_client(vip);
    udp_ask(&client, b"x").unwrap();
    assert_eq!(proxy.stats()[0].totals.connections_active, 1);
    eventually("flow expired", || {
        proxy.stats()[0].totals.connections_active == 0
    });
    // The client can start again: a new flow.
    udp_ask(&client, b"y").unwrap();
    assert_eq!(proxy.stats()[0].totals.connections_total, 2);
}

/// What the child prints when its proxy is up.
const CHILD_READY: &str = "SVCPROXY-CHILD-READY";

/// Runs in a child process (so its descriptor limit is its own): a proxy with a tight
/// RLIMIT_NOFILE. The parent opens more connections than it can hold.
fn exhaustion_child(backend: BackendKind) {
    let service_addr: SocketAddr = std::env::var("SVCPROXY_CHILD_SERVICE")
        .unwrap()
        .parse()
        .unwrap();
    let endpoint: SocketAddr = std::env::var("SVCPROXY_CHILD_ENDPOINT")
        .unwrap()
        .parse()
        .unwrap();
    let table = table();
    let mut config = config();
    config.workers = 1;
    let proxy = start(backend, &table, config);
    let svc = service(
        "tight",
        service_addr.ip(),
        service_addr.port(),
        Protocol::Tcp,
    );
    publish(&proxy, svc, vec![svcproxy::Endpoint::new(endpoint)]);
    // Room for about eight proxied connections (two descriptors each, plus pipes).
    let limit = (open_fds() + 20) as u64;
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(limit),
            maximum: rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum,
        },
    )
    .unwrap();
    println!("\n{CHILD_READY}");
    std::io::stdout().flush().unwrap();
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    proxy.shutdown(Duration::ZERO).unwrap();
    std::process::exit(0);
}

/// CPU time (user + system, clock ticks) a process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

pub fn descriptor_exhaustion_backs_off_and_recovers(backend: BackendKind, suite: u8) {
    if std::env::var_os("SVCPROXY_CHILD_SERVICE").is_some() {
        return exhaustion_child(backend);
    }
    let _g = shared();
    let server = TcpServer::identify();
    let vip = SocketAddr::new(service_ip(suite), 80);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "descriptor_exhaustion_backs_off_and_recovers",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SVCPROXY_CHILD_SERVICE", vip.to_string())
        .env("SVCPROXY_CHILD_ENDPOINT", server.addr.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains(CHILD_READY) {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0,
            "child exited early"
        );
    }

    // 40 clients: the kernel completes every handshake; the proxy serves what it can hold.
    let clients: Vec<TcpStream> = (0..40).map(|_| connect(vip).unwrap()).collect();
    let mut served = vec![false; clients.len()];
    let mut buf = [0u8; 64];
    let mut quiet_rounds = 0;
    while quiet_rounds < 5 {
        let mut fds: Vec<rustix::event::PollFd> = clients
            .iter()
            .zip(&served)
            .filter(|(_, s)| !**s)
            .map(|(c, _)| rustix::event::PollFd::new(c, rustix::event::PollFlags::IN))
            .collect();
        let timeout = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        let n = rustix::event::poll(&mut fds, Some(&timeout)).unwrap();
        drop(fds);
        if n == 0 {
            quiet_rounds += 1;
            continue;
        }
        quiet_rounds = 0;
        for (i, c) in clients.iter().enumerate() {
            if !served[i] {
                c.set_nonblocking(true).unwrap();
                if let Ok(k) = (&*c).read(&mut buf) {
                    assert!(
                        k > 0,
                        "client {i} was closed instead of served or kept waiting"
                    );
                    served[i] = true;
                }
                c.set_nonblocking(false).unwrap();
            }
        }
    }
    let count = served.iter().filter(|s| **s).count();
    assert!(
        count >= 1 && count < clients.len(),
        "{count} of 40 served under the limit"
    );
    assert!(child.try_wait().unwrap().is_none(), "the proxy survived");
    // Not spinning while out of descriptors: well under a quarter of a core over half a second.
    // Not measurable with SQPOLL, whose kernel thread polls (and is counted to the proxy) by
    // design.
    if !config().io_uring.sqpoll {
        let before = cpu_ticks(child.id());
        std::thread::sleep(Duration::from_millis(500));
        let used = cpu_ticks(child.id()) - before;
        assert!(
            used < 13,
            "the proxy used {used} ticks of CPU in 50 while stuck"
        );
    }

    // Free the served ones: every waiting client is served in turn.
    let (done, waiting): (Vec<_>, Vec<_>) = clients.into_iter().zip(served).partition(|(_, s)| *s);
    drop(done);
    for (c, _) in waiting {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&c), &mut line).unwrap();
        assert_eq!(line.trim().parse::<SocketAddr>().unwrap(), server.addr);
    }
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
}

pub fn ipv6_tcp_and_udp(backend: BackendKind, _suite: u8) {
    let _g = shared();
    let tcp = TcpServer::spawn(|mut s| {
        let _ = writeln!(s, "{}", s.peer_addr().unwrap());
    });
    let udp = UdpServer::echo();
    let table = table();
    let proxy = start(backend, &table, config());
    let ip: IpAddr = "::1".parse().unwrap();
    let port = std::net::TcpListener::bind("[::1]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // One endpoint (a pod) with a named port for each protocol.
    let named = |n: &str| svcproxy::TargetPort::Named(n.into());
    let svc = svcproxy::Service::new("v6")
        .address(ip)
        .port(
            svcproxy::ServicePort::tcp(port)
                .named("tcp")
                .target(named("t")),
        )
        .port(
            svcproxy::ServicePort::udp(port)
                .named("udp")
                .target(named("u")),
        );
    let pod = svcproxy::Endpoint::new(SocketAddr::from(([127, 0, 0, 1], 0)))
        .named_port("t", tcp.addr.port())
        .named_port("u", udp.addr.port());
    publish(&proxy, svc, vec![pod]);
    // TCP to an IPv4 backend through an IPv6 service address.
    let c = connect(SocketAddr::new(ip, port)).unwrap();
    let seen: SocketAddr = {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&c), &mut line).unwrap();
        line.trim().parse().unwrap()
    };
    assert!(seen.is_ipv4(), "the backend sees the proxy's IPv4 side");
    // UDP: the reply comes from [::1]:port.
    let client = std::net::UdpSocket::bind("[::1]:0").unwrap();
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    client.connect(SocketAddr::new(ip, port)).unwrap();
    let (from, echo) = udp_ask(&client, b"six").unwrap();
    assert_eq!((from, echo.as_slice()), (udp.addr, &b"six"[..]));
}

pub fn per_service_connection_limit_refuses_beyond_it(backend: BackendKind, suite: u8) {
    let _g = shared();
    let server = TcpServer::identify();
    let proxy = start(backend, &table(), config());
    let ip = service_ip(suite);
    let vip = SocketAddr::new(ip, 80);
    let mut svc = service("limited", ip, 80, Protocol::Tcp);
    svc.max_connections = Some(2);
    publish(&proxy, svc, vec![server.endpoint()]);
    let held: Vec<TcpStream> = (0..2).map(|_| connect(vip).unwrap()).collect();
    for c in &held {
        assert_eq!(who(c).unwrap(), server.addr);
    }
    // The third is refused (reset), and counted.
    let third = connect(vip).and_then(|c| who(&c));
    assert!(third.is_err(), "over the limit: {third:?}");
    assert_eq!(proxy.stats()[0].totals.refused, 1);
    drop(held);
    eventually("the limit to free", || {
        proxy.stats()[0].totals.connections_active == 0
    });
    assert_eq!(who_answers(vip).unwrap(), server.addr);
}

pub fn load_balancer_source_ranges_refuse_clients_outside_them(backend: BackendKind, suite: u8) {
    let _g = shared();
    let tcp = TcpServer::identify();
    let udp = UdpServer::echo();
    let proxy = start(backend, &table(), config());
    let ip = service_ip(suite);
    let named = |n: &str| svcproxy::TargetPort::Named(n.into());
    let mut svc = svcproxy::Service::new("ranged")
        .port(svcproxy::ServicePort::tcp(80).named("t").target(named("t")))
        .port(svcproxy::ServicePort::udp(53).named("u").target(named("u")));
    svc.load_balancer_addresses.push(ip);
    svc.load_balancer_source_ranges = vec!["127.0.0.1/32".parse().unwrap()];
    let pod = svcproxy::Endpoint::new(SocketAddr::from(([127, 0, 0, 1], 0)))
        .named_port("t", tcp.addr.port())
        .named_port("u", udp.addr.port());
    publish(&proxy, svc, vec![pod]);
    let outsider = IpAddr::from([127, suite, 255, 254]);
    let (tcp_vip, udp_vip) = (SocketAddr::new(ip, 80), SocketAddr::new(ip, 53));
    let refused = |port: &str| {
        let stats = proxy.stats();
        stats
            .iter()
            .find(|s| s.port == port)
            .unwrap()
            .totals
            .refused
    };
    // TCP: the client in the range is served; one outside is cut off, and counted.
    assert_eq!(who_answers(tcp_vip).unwrap(), tcp.addr);
    let outside = connect_from(outsider, tcp_vip).and_then(|c| who(&c));
    assert!(outside.is_err(), "outside the ranges: {outside:?}");
    assert_eq!(refused("t"), 1);
    // UDP: the datagram from outside is dropped (counted); the one from inside answered.
    let stranger = std::net::UdpSocket::bind(SocketAddr::new(outsider, 0)).unwrap();
    stranger.send_to(b"let me in", udp_vip).unwrap();
    eventually("the stranger's datagram to be refused", || {
        refused("u") == 1
    });
    let client = udp_client(udp_vip);
    assert_eq!(udp_ask(&client, b"hi").unwrap(), (udp.addr, b"hi".to_vec()));
    assert_eq!(refused("u"), 1);
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

pub fn digest(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Writes `payload` to the echo service at `vip` in random pieces of 1 to `max_piece` bytes
/// while the echo is read concurrently, then half-closes: what came back, to the end.
pub fn echo_in_pieces(vip: SocketAddr, payload: &[u8], max_piece: u64, rng: &mut Rng) -> Vec<u8> {
    let stream = connect(vip).unwrap();
    let reader = {
        let mut r = stream.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            r.read_to_end(&mut got).map(|_| got)
        })
    };
    let mut w = stream;
    let mut at = 0;
    while at < payload.len() {
        let n = (1 + rng.below(max_piece) as usize).min(payload.len() - at);
        w.write_all(&payload[at..at + n]).unwrap();
        at += n;
    }
    w.shutdown(Shutdown::Write).unwrap();
    reader.join().unwrap().unwrap()
}

/// Runs `connections` client exchanges, `exchange(i)` for each i, on 8 threads while the
/// caller changes the table: `change(n)` is called with n = 0, 1, ... until every exchange is
/// done or it returns false. Returns the failed exchanges and the number of changes made.
fn exchanges_during_changes(
    connections: usize,
    exchange: impl Fn(usize) -> std::io::Result<()> + Send + Sync + 'static,
    mut change: impl FnMut(usize) -> bool,
) -> (Vec<String>, usize) {
    const THREADS: usize = 8;
    let exchange = Arc::new(exchange);
    let done = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..THREADS)
        .map(|t| {
            let (exchange, done) = (exchange.clone(), done.clone());
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                for i in (t..connections).step_by(THREADS) {
                    if let Err(e) = exchange(i) {
                        failures.push(format!("connection {i}: {e}"));
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
                failures
            })
        })
        .collect();
    let mut changes = 0;
    while done.load(Ordering::SeqCst) < connections && change(changes) {
        changes += 1;
    }
    let failures = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    (failures, changes)
}

/// An echo backend: everything read is written back; at EOF it shuts down its side.
pub fn echo_server() -> TcpServer {
    TcpServer::spawn(|mut s| {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = s.shutdown(Shutdown::Write);
    })
}

pub fn random_payloads_arrive_intact(backend: BackendKind, suite: u8) {
    let _g = shared();
    let server = echo_server();
    let (_proxy, vip) = serve(
        backend,
        suite,
        config(),
        "bytes",
        Protocol::Tcp,
        80,
        vec![server.endpoint()],
    );
    let clients: Vec<_> = (0..16u64)
        .map(|c| {
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (c + 1));
                let mut checked = 0usize;
                for _ in 0..3 {
                    // Sizes from empty to 2 MiB, written in random pieces while the echo is
                    // read concurrently, then a half-close: the whole echo must still arrive.
                    let size = rng.below(2 << 20) as usize;
                    let payload = rng.bytes(size);
                    let want = digest(&payload);
                    let got = echo_in_pieces(vip, &payload, 64 << 10, &mut rng);
                    assert_eq!(got.len(), size, "client {c}: length");
                    assert_eq!(digest(&got), want, "client {c}: content of {size} bytes");
                    checked += size;
                }
                checked
            })
        })
        .collect();
    let total: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    assert!(total > 0);
}

pub fn udp_datagrams_arrive_intact(backend: BackendKind, suite: u8) {
    let _g = shared();
    let server = UdpServer::echo();
    let (_proxy, vip) = serve(
        backend,
        suite,
        config(),
        "dgrams",
        Protocol::Udp,
        53,
        vec![server.endpoint()],
    );
    let flows: Vec<_> = (0..8u64)
        .map(|f| {
            std::thread::spawn(move || {
                let mut rng = Rng(0x5151_5151 ^ (f + 1));
                let client = udp_client(vip);
                for _ in 0..100 {
                    let size = 1 + rng.below(60_000) as usize;
                    let payload = rng.bytes(size);
                    let (_, echo) = udp_ask(&client, &payload).unwrap();
                    assert!(
                        echo == payload,
                        "flow {f}: a {}-byte datagram changed",
                        payload.len()
                    );
                }
            })
        })
        .collect();
    for f in flows {
        f.join().unwrap();
    }
}

/// Bytes one side can push towards a peer that does not read before a write blocks for a
/// while: kernel buffers plus what the proxy holds.
fn push_until_blocked(stream: &mut TcpStream) -> usize {
    stream
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let chunk = vec![0x33u8; 64 << 10];
    let mut pushed = 0;
    // Bounded: 256 MiB at most, far above any sane buffering.
    while pushed < 256 << 20 {
        match stream.write(&chunk) {
            Ok(n) => pushed += n,
            Err(_) => break,
        }
    }
    pushed
}

/// Far more than socket buffers (a few MiB each way) plus one pipe or a few buffers.
const HELD_BACK: usize = 64 << 20;

pub fn a_backend_that_never_reads_holds_back_its_client(backend: BackendKind, suite: u8) {
    let _g = shared();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(release_rx);
    let server = TcpServer::spawn(move |s| {
        // Accept, never read, keep the connection until released.
        let _ = release_rx.lock().unwrap().recv_timeout(IO_TIMEOUT);
        drop(s);
    });
    let (proxy, vip) = serve(
        backend,
        suite,
        config(),
        "stalled",
        Protocol::Tcp,
        80,
        vec![server.endpoint()],
    );
    let mut c = connect(vip).unwrap();
    let pushed = push_until_blocked(&mut c);
    assert!(
        pushed < HELD_BACK,
        "{pushed} bytes went into a backend that reads nothing"
    );
    assert!(proxy.stats()[0].totals.bytes_in < HELD_BACK as u64);
    drop(release_tx);
}

pub fn a_client_that_never_reads_holds_back_its_backend(backend: BackendKind, suite: u8) {
    let _g = shared();
    let pushed = Arc::new(AtomicUsize::new(0));
    let server = {
        let pushed = pushed.clone();
        TcpServer::spawn(move |mut s| {
            pushed.store(push_until_blocked(&mut s), Ordering::SeqCst);
        })
    };
    let (_proxy, vip) = serve(
        backend,
        suite,
        config(),
        "deaf",
        Protocol::Tcp,
        80,
        vec![server.endpoint()],
    );
    let c = connect(vip).unwrap();
    eventually("the backend to block", || pushed.load(Ordering::SeqCst) > 0);
    let pushed = pushed.load(Ordering::SeqCst);
    assert!(
        pushed < HELD_BACK,
        "{pushed} bytes went towards a client that reads nothing"
    );
    drop(c);
}

pub fn table_swaps_every_millisecond_fail_no_connection(backend: BackendKind, suite: u8) {
    let _g = shared();
    let servers: Vec<TcpServer> = (0..3).map(|_| TcpServer::identify()).collect();
    let endpoints = |which: &[usize]| {
        which
            .iter()
            .map(|&i| servers[i].endpoint())
            .collect::<Vec<_>>()
    };
    let (proxy, vip) = serve(
        backend,
        suite,
        config(),
        "swaps",
        Protocol::Tcp,
        80,
        endpoints(&[0, 1, 2]),
    );
    const CONNECTIONS: usize = 10_000;
    // Every set keeps at least two live endpoints; each swap is published at once.
    let sets: [&[usize]; 3] = [&[0, 1], &[1, 2], &[2, 0]];
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let exchange = move |_| who_answers(vip).map(drop);
    let (failures, swaps) = exchanges_during_changes(CONNECTIONS, exchange, |n| {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        proxy
            .table()
            .apply(svcproxy::Batch::new().replace_endpoints("swaps", endpoints(sets[n % 3])))
            .unwrap();
        std::thread::sleep(Duration::from_millis(1));
        true
    });
    assert!(
        failures.is_empty(),
        "{} of {CONNECTIONS} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(swaps > 100, "{swaps} table swaps during the run");
}

/// Publishes a service whose name makes `worker` panic while applying the table (see
/// `svcproxy_core::fault`; this package's tests build the core with fault injection):
/// `times` times in this process, or every time.
fn inject_panic(proxy: &svcproxy::Proxy, suite: u8, worker: usize, times: Option<u32>) {
    let limit = times.map_or("always".to_string(), |n| n.to_string());
    let name = format!("fault-injection/panic-{worker}-{limit}-suite{suite}");
    let svc = service(
        &name,
        service_ip(suite),
        free_port(Protocol::Tcp),
        Protocol::Tcp,
    );
    proxy
        .table()
        .apply(svcproxy::Batch::new().upsert(svc))
        .unwrap();
}

pub fn a_worker_that_panics_is_restarted_then_reported_down(backend: BackendKind, suite: u8) {
    let _g = shared();
    let server = TcpServer::identify();
    let config = svcproxy::ProxyConfig {
        workers: 1,
        ..config()
    };
    let (proxy, vip) = serve(
        backend,
        suite,
        config,
        "supervised",
        Protocol::Tcp,
        free_port(Protocol::Tcp),
        vec![server.endpoint()],
    );
    let held = connect(vip).unwrap();
    assert_eq!(who(&held).unwrap(), server.addr);

    // One panic: the worker is restarted (its connections are lost) and serves again.
    inject_panic(&proxy, suite, 0, Some(1));
    proxy
        .sync(IO_TIMEOUT)
        .expect("the restarted worker applies the table");
    let health = &proxy.workers()[0];
    assert_eq!(health.restarts, 1, "{health:?}");
    assert!(!health.down);
    let reason = health.last_failure.as_deref().unwrap_or_default();
    assert!(reason.contains("panicked: fault injected"), "{reason}");
    let active = |proxy: &svcproxy::Proxy| {
        let stats = proxy.stats();
        let port = stats.iter().find(|s| s.service == "supervised").unwrap();
        port.totals.connections_active
    };
    assert_eq!(active(&proxy), 0, "the lost connection is not counted open");
    assert_eq!(proxy.connections(), 0, "its budget unit went back");
    assert_eq!(who_answers(vip).unwrap(), server.addr);
    assert!(proxy.down().is_none());
    drop(held);

    // A panic at every restart: the worker is given up on, and the proxy says so.
    inject_panic(&proxy, suite, 0, None);
    let err = proxy
        .sync(IO_TIMEOUT)
        .expect_err("a worker that is down fails sync");
    assert!(
        matches!(&err, svcproxy::Error::Worker { worker: 0, .. }),
        "{err}"
    );
    let health = &proxy.workers()[0];
    assert!(health.down, "{health:?}");
    // Failures in a row (the run between them was short): the first one counts.
    assert_eq!(
        health.restarts,
        u64::from(svcproxy::core::supervisor::MAX_RESTARTS)
    );
    assert!(
        connect(vip).and_then(|s| who(&s)).is_err(),
        "nothing serves"
    );
    let stopped = proxy
        .shutdown(Duration::ZERO)
        .expect_err("shutdown reports it");
    assert!(err.to_string().contains("fault injected"), "{err}");
    assert!(stopped.to_string().contains("fault injected"), "{stopped}");
}
