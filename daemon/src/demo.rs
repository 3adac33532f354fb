//! `svcproxyd demo`: three TCP and two UDP backends on loopback, a service in front of each
//! kind, a few seconds of traffic, then which backend answered how often, throughput and
//! latency. Needs no setup and no privileges.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use svcproxy::{Batch, Endpoint, Options, Protocol, Proxy, Service, ServicePort, Table};

const CLIENTS: usize = 4;

/// Runs the demo for `run_for`.
pub fn run(run_for: Duration) -> Result<(), Box<dyn std::error::Error>> {
    // Backends: each TCP backend answers every 64-byte request with its name padded to 64
    // bytes; each UDP backend echoes with its name in front.
    let mut tcp_endpoints = Vec::new();
    for name in ["alpha", "bravo", "charlie"] {
        let l = TcpListener::bind("127.0.0.1:0")?;
        tcp_endpoints.push(Endpoint::new(l.local_addr()?));
        std::thread::spawn(move || tcp_backend(l, name));
    }
    let mut udp_endpoints = Vec::new();
    for name in ["delta", "echo"] {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        udp_endpoints.push(Endpoint::new(s.local_addr()?));
        std::thread::spawn(move || udp_backend(s, name));
    }

    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let tcp_vip = SocketAddr::from(([127, 0, 0, 1], port));
    let udp_vip = SocketAddr::from(([127, 0, 0, 1], port));
    let table = Arc::new(Table::default());
    let web = Service::new("demo/web")
        .address(tcp_vip.ip())
        .port(ServicePort::new(Protocol::Tcp, port));
    let dns = Service::new("demo/dns")
        .address(udp_vip.ip())
        .port(ServicePort::new(Protocol::Udp, port));
    table.apply(
        Batch::new()
            .upsert(web)
            .replace_endpoints("demo/web", tcp_endpoints)
            .upsert(dns)
            .replace_endpoints("demo/dns", udp_endpoints),
    )?;
    let proxy = Proxy::start(table.clone(), Options::default())?;
    println!(
        "svcproxy demo: {:?} backend, service {tcp_vip}/TCP -> alpha, bravo, charlie; {udp_vip}/UDP -> delta, echo",
        proxy.backend()
    );
    println!(
        "driving traffic for {run_for:?} with {CLIENTS} TCP clients (one request per connection) and one UDP client\n"
    );

    let started = Instant::now();
    let tcp: Vec<_> = (0..CLIENTS)
        .map(|_| std::thread::spawn(move || tcp_client(tcp_vip, run_for)))
        .collect();
    let udp = std::thread::spawn(move || udp_client(udp_vip, run_for));
    let mut answers = BTreeMap::new();
    let mut latencies = Vec::new();
    for t in tcp {
        let (a, l) = t.join().expect("client thread")?;
        for (k, v) in a {
            *answers.entry(k).or_insert(0u64) += v;
        }
        latencies.extend(l);
    }
    let (udp_answers, udp_count) = udp.join().expect("client thread")?;
    let elapsed = started.elapsed();

    latencies.sort_unstable();
    let pct = |p: f64| {
        let last = latencies.len().saturating_sub(1);
        latencies
            .get((last as f64 * p) as usize)
            .copied()
            .unwrap_or_default()
    };
    let total: u64 = answers.values().sum();
    println!("TCP: {total} connections, each one 64-byte request and reply");
    for (name, n) in &answers {
        println!(
            "  {name:>8}: {n:>7} ({:.1}%)",
            *n as f64 * 100.0 / total.max(1) as f64
        );
    }
    println!(
        "  {:.0} connections/s; latency per connection (connect + request + reply): p50 {:?}, p99 {:?}",
        total as f64 / elapsed.as_secs_f64(),
        pct(0.5),
        pct(0.99)
    );
    println!("UDP: {udp_count} datagrams, every reply from {udp_vip}");
    for (name, n) in &udp_answers {
        println!("  {name:>8}: {n:>7}");
    }
    println!("\nproxy counters:");
    for s in proxy.stats() {
        let t = s.totals;
        println!(
            "  {}/{}/{}: {} connections or flows, {} bytes in, {} bytes out, {} datagrams in, {} out",
            s.service,
            s.port,
            s.protocol,
            t.connections_total,
            t.bytes_in,
            t.bytes_out,
            t.datagrams_in,
            t.datagrams_out
        );
    }
    proxy.shutdown(Duration::from_secs(1))?;
    Ok(())
}

fn tcp_backend(listener: TcpListener, name: &'static str) {
    for mut stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut request = [0u8; 64];
            let mut reply = [b' '; 64];
            reply[..name.len()].copy_from_slice(name.as_bytes());
            while stream.read_exact(&mut request).is_ok() {
                if stream.write_all(&reply).is_err() {
                    break;
                }
            }
        });
    }
}

fn udp_backend(socket: UdpSocket, name: &'static str) {
    let mut buf = [0u8; 2048];
    while let Ok((n, from)) = socket.recv_from(&mut buf) {
        let mut reply = name.as_bytes().to_vec();
        reply.push(b'|');
        reply.extend_from_slice(&buf[..n]);
        let _ = socket.send_to(&reply, from);
    }
}

type Answers = BTreeMap<String, u64>;

fn tcp_client(vip: SocketAddr, run_for: Duration) -> std::io::Result<(Answers, Vec<Duration>)> {
    let mut answers = Answers::new();
    let mut latencies = Vec::new();
    let end = Instant::now() + run_for;
    let request = [b'?'; 64];
    while Instant::now() < end {
        let t = Instant::now();
        let mut s = TcpStream::connect(vip)?;
        s.set_nodelay(true)?;
        s.write_all(&request)?;
        let mut reply = [0u8; 64];
        s.read_exact(&mut reply)?;
        latencies.push(t.elapsed());
        let name = String::from_utf8_lossy(&reply).trim().to_string();
        *answers.entry(name).or_insert(0) += 1;
    }
    Ok((answers, latencies))
}

fn udp_client(vip: SocketAddr, run_for: Duration) -> std::io::Result<(Answers, u64)> {
    let mut answers = Answers::new();
    let mut count = 0;
    let end = Instant::now() + run_for;
    while Instant::now() < end {
        // A new socket per 100 queries: a new flow, balanced on its own.
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.connect(vip)?; // accepts replies from the service address only
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        for _ in 0..100 {
            socket.send(b"query")?;
            let mut buf = [0u8; 2048];
            let n = socket.recv(&mut buf)?;
            let name = buf[..n].split(|&b| b == b'|').next().unwrap_or_default();
            *answers
                .entry(String::from_utf8_lossy(name).into_owned())
                .or_insert(0) += 1;
            count += 1;
        }
    }
    Ok((answers, count))
}
