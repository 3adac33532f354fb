//! The load generator: each workload runs on one client thread (a current-thread tokio
//! runtime, in the client namespace) against a target: the proxy's address, or for "direct" and
//! the backends' addresses in turn.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// Where clients connect, per workload kind. Several addresses are used in turn.
#[derive(Debug, Clone)]
pub struct Target {
    pub echo: Vec<SocketAddr>,
    pub sink: Vec<SocketAddr>,
    pub udp: Vec<SocketAddr>,
    pub http: Vec<SocketAddr>,
}

fn pick(addrs: &[SocketAddr], i: usize) -> SocketAddr {
    addrs[i % addrs.len()]
}

/// Runs `f` on a fresh thread in namespace `ns` with a current-thread runtime.
pub fn on_client<T: Send + 'static>(
    ns: Option<&'static str>,
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
) -> io::Result<T> {
    std::thread::spawn(move || -> io::Result<T> {
        crate::topo::enter(ns)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(f()))
    })
    .join()
    .map_err(|_| io::Error::other("client thread panicked"))?
}

/// Bulk upload over `streams` connections for `duration` (after a warm-up): Gbit/s as counted
/// by the backends.
pub async fn bulk(
    target: Target,
    streams: usize,
    duration: Duration,
    sunk: Arc<AtomicU64>,
) -> io::Result<f64> {
    let warmup = Duration::from_millis(500);
    let end = Instant::now() + warmup + duration;
    let mut tasks = Vec::new();
    for i in 0..streams {
        let addr = pick(&target.sink, i);
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await?;
            let chunk = vec![0x5au8; 64 << 10];
            while Instant::now() < end {
                s.write_all(&chunk).await?;
            }
            Ok::<_, io::Error>(())
        }));
    }
    tokio::time::sleep(warmup).await;
    let (t0, b0) = (Instant::now(), sunk.load(Ordering::Relaxed));
    tokio::time::sleep(duration).await;
    let (t1, b1) = (Instant::now(), sunk.load(Ordering::Relaxed));
    for t in tasks {
        t.await.map_err(io::Error::other)??;
    }
    Ok((b1 - b0) as f64 * 8.0 / (t1 - t0).as_secs_f64() / 1e9)
}

pub struct RrResult {
    pub rps: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
}

/// Request/response: `conns` connections, each sending a 64-byte request and waiting for the
/// 64-byte reply, as fast as they can.
pub async fn request_response(
    target: Target,
    conns: usize,
    duration: Duration,
) -> io::Result<RrResult> {
    let warmup = Duration::from_millis(500);
    let start = Instant::now() + warmup;
    let end = start + duration;
    let mut tasks = Vec::new();
    for i in 0..conns {
        let addr = pick(&target.echo, i);
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            let req = [7u8; 64];
            let mut rep = [0u8; 64];
            let mut lat = Vec::with_capacity(1 << 16);
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                s.write_all(&req).await?;
                s.read_exact(&mut rep).await?;
                if t >= start {
                    lat.push(t.elapsed());
                }
            }
            Ok::<_, io::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.map_err(io::Error::other)??);
    }
    all.sort_unstable();
    let at = |p: f64| {
        all.get(((all.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or_default()
    };
    Ok(RrResult {
        rps: all.len() as f64 / duration.as_secs_f64(),
        p50: at(0.5),
        p99: at(0.99),
        p999: at(0.999),
    })
}

/// New connections per second: `concurrency` clients, each connecting, exchanging 64 bytes and
/// closing, over and over. Returns (connections/s, failures).
pub async fn connection_rate(
    target: Target,
    concurrency: usize,
    duration: Duration,
) -> io::Result<(f64, u64)> {
    let warmup = Duration::from_millis(300);
    let start = Instant::now() + warmup;
    let end = start + duration;
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let (addrs, done, failed) = (target.echo.clone(), done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = i;
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let once = async {
                    let mut s = TcpStream::connect(pick(&addrs, n)).await?;
                    s.set_nodelay(true)?;
                    s.write_all(&[1u8; 64]).await?;
                    let mut rep = [0u8; 64];
                    s.read_exact(&mut rep).await?;
                    Ok::<_, io::Error>(())
                };
                let ok = once.await.is_ok();
                if t >= start {
                    if ok {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                n += concurrency;
            }
        }));
    }
    for t in tasks {
        t.await.map_err(io::Error::other)?;
    }
    Ok((
        done.load(Ordering::Relaxed) as f64 / duration.as_secs_f64(),
        failed.load(Ordering::Relaxed),
    ))
}

/// Opens `count` connections (each proven through with a one-byte echo), calls `measure`
/// while they are all open, then closes them.
pub async fn idle<T>(target: Target, count: usize, measure: impl FnOnce() -> T) -> io::Result<T> {
    let opened = Arc::new(AtomicUsize::new(0));
    let mut held = Vec::with_capacity(count);
    let mut batch = Vec::new();
    for i in 0..count {
        let addr = pick(&target.echo, i);
        let opened = opened.clone();
        batch.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(b"i").await?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            opened.fetch_add(1, Ordering::Relaxed);
            Ok::<_, io::Error>(s)
        }));
        if batch.len() == 256 || i + 1 == count {
            for t in batch.drain(..) {
                held.push(t.await.map_err(io::Error::other)??);
            }
        }
    }
    // Give the proxy a moment to settle its per-connection state after the last echo.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let result = measure();
    drop(held);
    Ok(result)
}

pub struct UdpResult {
    pub delivered: f64,
    pub loss: f64,
}

/// UDP over `flows` client sockets, each keeping a window of datagrams in flight: datagrams/s
/// delivered back (echoed) and the fraction lost.
pub async fn udp(
    target: Target,
    flows: usize,
    size: usize,
    duration: Duration,
) -> io::Result<UdpResult> {
    const WINDOW: usize = 8;
    let warmup = Duration::from_millis(300);
    let start = Instant::now() + warmup;
    let end = start + duration;
    let mut tasks = Vec::new();
    for i in 0..flows {
        let addr = pick(&target.udp, i);
        tasks.push(tokio::spawn(async move {
            let local: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            }
            .parse()
            .unwrap();
            let s = UdpSocket::bind(local).await?;
            s.connect(addr).await?;
            let payload = vec![0x42u8; size];
            let mut buf = vec![0u8; 65_536];
            let (mut sent, mut got) = (0u64, 0u64);
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                for _ in 0..WINDOW {
                    s.send(&payload).await?;
                }
                let mut received = 0;
                while received < WINDOW {
                    match tokio::time::timeout(Duration::from_millis(50), s.recv(&mut buf)).await {
                        Ok(Ok(_)) => received += 1,
                        Ok(Err(_)) | Err(_) => break,
                    }
                }
                if t >= start {
                    sent += WINDOW as u64;
                    got += received as u64;
                }
            }
            Ok::<_, io::Error>((sent, got))
        }));
    }
    let (mut sent, mut got) = (0, 0);
    for t in tasks {
        let (s, g) = t.await.map_err(io::Error::other)??;
        sent += s;
        got += g;
    }
    Ok(UdpResult {
        delivered: got as f64 / duration.as_secs_f64(),
        loss: if sent == 0 {
            0.0
        } else {
            1.0 - got as f64 / sent as f64
        },
    })
}

/// UDP sent as fast as the client can (open loop): one thread sends `size`-byte datagrams over
/// `flows` connected sockets in turn, blocking only when a socket's send buffer is full, and a
/// thread per socket counts the echoes. Datagrams/s delivered back, and the fraction lost.
/// Blocking threads, started from the calling thread (so in its network namespace).
pub fn udp_flood(
    target: &Target,
    flows: usize,
    size: usize,
    duration: Duration,
) -> io::Result<UdpResult> {
    let sockets = (0..flows)
        .map(|i| {
            let addr = pick(&target.udp, i);
            let local: SocketAddr = match addr {
                SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
                SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            let s = std::net::UdpSocket::bind(local)?;
            s.connect(addr)?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            Ok(s)
        })
        .collect::<io::Result<Vec<_>>>()?;
    let start = Instant::now() + Duration::from_millis(300);
    let end = start + duration;
    // Echoes of the last datagrams sent are still on their way at the end.
    let drained = end + Duration::from_millis(200);
    std::thread::scope(|scope| {
        let counters: Vec<_> = sockets
            .iter()
            .map(|s| {
                scope.spawn(move || {
                    let mut buf = vec![0u8; 65_536];
                    let mut got = 0u64;
                    while Instant::now() < drained {
                        if s.recv(&mut buf).is_ok() && Instant::now() >= start {
                            got += 1;
                        }
                    }
                    got
                })
            })
            .collect();
        let payload = vec![0x42u8; size];
        let mut sent = 0u64;
        for s in sockets.iter().cycle() {
            let now = Instant::now();
            if now >= end {
                break;
            }
            if s.send(&payload).is_ok() && now >= start {
                sent += 1;
            }
        }
        let got: u64 = counters.into_iter().map(|c| c.join().unwrap_or(0)).sum();
        Ok(UdpResult {
            delivered: got as f64 / duration.as_secs_f64(),
            loss: if sent == 0 {
                0.0
            } else {
                1.0 - (got as f64 / sent as f64).min(1.0)
            },
        })
    })
}
