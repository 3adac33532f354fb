//! Soak: steady mixed load through each backend in turn, then the books are checked.
//!
//! Per backend, for `SVCPROXY_SOAK_SECS` seconds (default 5, the short form `cargo test` and CI
//! run; a real soak is `SVCPROXY_SOAK_SECS=180 cargo test --release --test soak -- --nocapture`):
//! short TCP connections with random payloads and a half-close, long-lived TCP connections doing
//! request/response, UDP flows in lock step, and the endpoint set of both services replaced every
//! 50 ms. Every byte and datagram is checked by content. At the end:
//!
//! - no client saw an error, and the proxy's counters agree with the clients' books exactly
//!   (bytes in = bytes sent = bytes out = bytes received for the echo service, connections
//!   and datagrams likewise), with no connection or flow left open;
//! - RSS at the end of the load is at most [`RSS_GROWTH_BOUND`] above RSS after warm-up;
//! - after shutdown the process has exactly the descriptors it had before.
//!
//! Then, per backend, a burst of short connections (`SVCPROXY_SOAK_CONNS`, default 20,000; a
//! real check is 200,000) opened and closed as fast as two clients can: whatever a closed
//! connection leaves behind (a timer entry, a slot) shows as RSS growing with their number, so
//! growth after warm-up must stay under [`SHORT_CONN_SLACK`] plus [`SHORT_CONN_BYTES`] per
//! connection. (A timer entry left per connection costs about 32 bytes.)
//!
//! It runs alone in its own test binary: descriptors and RSS are per process.

mod behaviour;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use behaviour::harness::*;
use behaviour::{Rng, digest, echo_in_pieces, echo_server};
use svcproxy::{
    BackendKind, CounterValues, Endpoint, Forwarding, Protocol, Proxy, ProxyConfig, Table,
};

/// How much RSS may grow between the end of warm-up and the end of the load. Working memory
/// (payload buffers, thread stacks, allocator arenas) settles during warm-up; a leak of even
/// one small allocation per connection or datagram exceeds this within a long soak.
const RSS_GROWTH_BOUND: u64 = 32 << 20;

/// RSS the short-connection burst may grow by whatever the count (allocator and page noise).
const SHORT_CONN_SLACK: u64 = 256 << 10;

/// RSS the short-connection burst may grow by per connection.
const SHORT_CONN_BYTES: u64 = 4;

/// Upper bound on iterations of any load loop, whatever the duration.
const MAX_ITERATIONS: u64 = 10_000_000;

fn soak_secs() -> u64 {
    std::env::var("SVCPROXY_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

fn soak_connections() -> u64 {
    std::env::var("SVCPROXY_SOAK_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
        .min(MAX_ITERATIONS)
}

/// What the clients did, to compare with the proxy's counters.
#[derive(Debug, Default, Clone, Copy)]
struct Books {
    connections: u64,
    bytes_sent: u64,
    bytes_received: u64,
    datagrams_sent: u64,
    datagrams_received: u64,
}

impl std::ops::AddAssign for Books {
    fn add_assign(&mut self, o: Self) {
        self.connections += o.connections;
        self.bytes_sent += o.bytes_sent;
        self.bytes_received += o.bytes_received;
        self.datagrams_sent += o.datagrams_sent;
        self.datagrams_received += o.datagrams_received;
    }
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

/// One connection: a random payload written in random pieces while the echo is read, then a
/// half-close; the whole echo must come back.
fn short_connection(vip: SocketAddr, rng: &mut Rng, books: &mut Books) {
    let size = rng.below(256 << 10) as usize;
    let payload = rng.bytes(size);
    let got = echo_in_pieces(vip, &payload, 32 << 10, rng);
    assert_eq!(got.len(), size, "short connection: length");
    assert_eq!(digest(&got), digest(&payload), "short connection: content");
    books.connections += 1;
    books.bytes_sent += size as u64;
    books.bytes_received += size as u64;
}

/// One connection for the whole soak: requests of random sizes, each echo read in full.
fn long_connection(vip: SocketAddr, rng: &mut Rng, stop: &AtomicBool, books: &mut Books) {
    let mut stream = connect(vip).unwrap();
    let mut echo = vec![0u8; 16 << 10];
    for _ in 0..MAX_ITERATIONS {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let size = 1 + rng.below(16 << 10) as usize;
        let request = rng.bytes(size);
        stream.write_all(&request).unwrap();
        stream.read_exact(&mut echo[..request.len()]).unwrap();
        assert!(
            echo[..request.len()] == request[..],
            "long connection: content"
        );
        books.bytes_sent += request.len() as u64;
        books.bytes_received += request.len() as u64;
    }
    stream.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(
        rest.is_empty(),
        "long connection: bytes after the last echo"
    );
    books.connections += 1;
}

/// A UDP flow in lock step: every datagram's echo must match it.
fn udp_flow(vip: SocketAddr, rng: &mut Rng, stop: &AtomicBool, books: &mut Books) {
    let client = udp_client(vip);
    for _ in 0..MAX_ITERATIONS {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let size = if rng.below(50) == 0 {
            1 + rng.below(60_000)
        } else {
            1 + rng.below(1400)
        };
        let payload = rng.bytes(size as usize);
        let (_, echo) = udp_ask(&client, &payload).unwrap();
        assert!(echo == payload, "udp: a {size}-byte datagram changed");
        books.datagrams_sent += 1;
        books.datagrams_received += 1;
    }
}

fn totals(proxy: &Proxy, service: &str) -> CounterValues {
    let mut sum = CounterValues::default();
    for port in proxy.stats().into_iter().filter(|p| p.service == service) {
        sum += port.totals;
    }
    sum
}

/// A random non-empty subset of `endpoints`.
fn some_of(endpoints: &[Endpoint], rng: &mut Rng) -> Vec<Endpoint> {
    let mask = 1 + rng.below((1 << endpoints.len()) - 1);
    endpoints
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, e)| e.clone())
        .collect()
}

fn soak(name: &str, backend: BackendKind, adjust: fn(&mut ProxyConfig)) {
    let secs = soak_secs();
    let fds_before = open_fds();
    let tcp_servers: Vec<_> = (0..3).map(|_| echo_server()).collect();
    let udp_servers: Vec<_> = (0..3).map(|_| UdpServer::echo()).collect();
    let tcp_endpoints: Vec<_> = tcp_servers.iter().map(|s| s.endpoint()).collect();
    let udp_endpoints: Vec<_> = udp_servers.iter().map(|s| s.endpoint()).collect();

    let mut config = config();
    config.udp_idle_timeout = Duration::from_secs(1);
    adjust(&mut config);
    let proxy = start(backend, &Arc::new(Table::default()), config);
    let ip = service_ip(110);
    publish(
        &proxy,
        service("soak-tcp", ip, 80, Protocol::Tcp),
        tcp_endpoints.clone(),
    );
    publish(
        &proxy,
        service("soak-udp", ip, 53, Protocol::Udp),
        udp_endpoints.clone(),
    );
    let (tcp_vip, udp_vip) = (SocketAddr::new(ip, 80), SocketAddr::new(ip, 53));

    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut clients: Vec<JoinHandle<Books>> = Vec::new();
    for c in 0..4u64 {
        clients.push(std::thread::spawn(move || {
            let mut rng = Rng(0x50a4 ^ (c + 1));
            let mut books = Books::default();
            for _ in 0..MAX_ITERATIONS {
                if Instant::now() >= deadline {
                    break;
                }
                short_connection(tcp_vip, &mut rng, &mut books);
            }
            books
        }));
    }
    for c in 0..2u64 {
        let stop = stop.clone();
        clients.push(std::thread::spawn(move || {
            let mut rng = Rng(0x10c6 ^ (c + 1));
            let mut books = Books::default();
            long_connection(tcp_vip, &mut rng, &stop, &mut books);
            books
        }));
    }
    for c in 0..2u64 {
        let stop = stop.clone();
        clients.push(std::thread::spawn(move || {
            let mut rng = Rng(0x0d9 ^ (c + 1));
            let mut books = Books::default();
            udp_flow(udp_vip, &mut rng, &stop, &mut books);
            books
        }));
    }

    // Churn the endpoints while the load runs; sample RSS after a fifth of the time.
    let mut rng = Rng(0xc4a2);
    let warm_at = Instant::now() + Duration::from_secs(secs).mul_f64(0.2);
    let mut rss_warm = None;
    let mut swaps = 0u64;
    while Instant::now() < deadline && swaps < MAX_ITERATIONS {
        std::thread::sleep(Duration::from_millis(50));
        set_endpoints(&proxy, "soak-tcp", some_of(&tcp_endpoints, &mut rng));
        set_endpoints(&proxy, "soak-udp", some_of(&udp_endpoints, &mut rng));
        swaps += 1;
        if rss_warm.is_none() && Instant::now() >= warm_at {
            rss_warm = Some(rss_bytes());
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut books = Books::default();
    for c in clients {
        books += c.join().expect("a client failed");
    }
    let rss_end = rss_bytes();
    let rss_warm = rss_warm.unwrap_or(rss_end);

    eventually("every connection and flow closed", || {
        totals(&proxy, "soak-tcp").connections_active == 0
            && totals(&proxy, "soak-udp").connections_active == 0
            && totals(&proxy, "soak-tcp").bytes_out == books.bytes_received
    });
    let tcp = totals(&proxy, "soak-tcp");
    let udp = totals(&proxy, "soak-udp");
    assert_eq!(proxy.connections(), 0, "{name}: connections open");
    assert_eq!(
        tcp.connections_total, books.connections,
        "{name}: tcp connections"
    );
    assert_eq!(tcp.bytes_in, books.bytes_sent, "{name}: tcp bytes in");
    assert_eq!(tcp.bytes_out, books.bytes_received, "{name}: tcp bytes out");
    assert_eq!(
        (tcp.connect_errors, tcp.refused),
        (0, 0),
        "{name}: tcp errors"
    );
    assert_eq!(
        udp.datagrams_in, books.datagrams_sent,
        "{name}: datagrams in"
    );
    assert_eq!(
        udp.datagrams_out, books.datagrams_received,
        "{name}: datagrams out"
    );
    assert!(
        rss_end <= rss_warm + RSS_GROWTH_BOUND,
        "{name}: RSS grew from {rss_warm} to {rss_end} bytes"
    );

    proxy.shutdown(IO_TIMEOUT).unwrap();
    drop(tcp_servers);
    drop(udp_servers);
    let fds_after = open_fds();
    println!(
        "soak {name}: {secs} s, {} TCP connections, {} bytes each way checked, {} datagrams \
         checked, {swaps} endpoint swaps; RSS {} MiB after warm-up, {} MiB at the end; \
         descriptors {fds_before} before, {fds_after} after",
        books.connections,
        books.bytes_sent,
        books.datagrams_sent,
        rss_warm >> 20,
        rss_end >> 20,
    );
    assert_eq!(fds_after, fds_before, "{name}: descriptors leaked");
}

/// `count` connections from two clients, each a one-byte echo and a close.
fn connection_burst(vip: SocketAddr, count: u64) {
    let clients: Vec<JoinHandle<()>> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                let mut byte = [0u8; 1];
                for _ in 0..count / 2 {
                    let mut s = connect(vip).unwrap();
                    s.write_all(b"x").unwrap();
                    s.read_exact(&mut byte).unwrap();
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("a client failed");
    }
}

fn short_connections(name: &str, backend: BackendKind, adjust: fn(&mut ProxyConfig)) {
    let count = soak_connections();
    let server = echo_server();
    let mut config = config();
    adjust(&mut config);
    let proxy = start(backend, &Arc::new(Table::default()), config);
    let ip = service_ip(111);
    publish(
        &proxy,
        service("burst", ip, 80, Protocol::Tcp),
        vec![server.endpoint()],
    );
    let vip = SocketAddr::new(ip, 80);
    connection_burst(vip, count / 10);
    eventually("the warm-up's connections closed", || {
        proxy.connections() == 0
    });
    let rss_warm = rss_bytes();
    let started = Instant::now();
    connection_burst(vip, count);
    let elapsed = started.elapsed();
    eventually("every connection closed", || proxy.connections() == 0);
    let rss_end = rss_bytes();
    let growth = rss_end.saturating_sub(rss_warm);
    println!(
        "short connections {name}: {count} in {elapsed:.1?}; RSS {} KiB after warm-up, {} KiB \
         after, {:.2} bytes per connection",
        rss_warm >> 10,
        rss_end >> 10,
        growth as f64 / count as f64,
    );
    assert!(
        growth <= SHORT_CONN_SLACK + SHORT_CONN_BYTES * count,
        "{name}: RSS grew by {growth} bytes over {count} closed connections"
    );
    let total = totals(&proxy, "burst");
    assert_eq!(total.connections_active, 0, "{name}: connections open");
    proxy.shutdown(IO_TIMEOUT).unwrap();
}

/// A backend or io_uring mode: its name, kind and settings.
type Mode = (&'static str, BackendKind, fn(&mut ProxyConfig));

/// Each backend and io_uring mode.
const BACKENDS: [Mode; 3] = [
    ("epoll", BackendKind::Epoll, |_| {}),
    ("io_uring", BackendKind::IoUring, |_| {}),
    ("io_uring splice", BackendKind::IoUring, |c| {
        c.io_uring.forwarding = Forwarding::Splice
    }),
];

#[test]
fn mixed_load_leaks_nothing_and_the_counters_add_up() {
    let uring = svcproxy::io_uring_available();
    for (name, backend, adjust) in BACKENDS {
        if backend == BackendKind::IoUring && uring.is_err() {
            continue;
        }
        soak(name, backend, adjust);
        short_connections(name, backend, adjust);
    }
    match uring {
        Ok(()) => {}
        Err(why) if std::env::var_os("CI").is_none() => {
            println!("soak io_uring: skipped, io_uring is not available ({why})")
        }
        Err(why) => panic!("io_uring is not available in CI: {why}"),
    }
}
