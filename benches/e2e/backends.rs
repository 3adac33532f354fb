//! The backends every candidate forwards to: per backend address a TCP echo server, a TCP sink
//! (counts what it receives) and a UDP echo server, all on one thread (a current-thread tokio
//! runtime) in the backend namespace.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::oneshot;

/// Service and backend ports (the same numbers, so kernel DNAT needs no port rewrite).
pub const ECHO_PORT: u16 = 8000;
pub const SINK_PORT: u16 = 8001;
pub const UDP_PORT: u16 = 8002;
/// Served by nginx ([`crate::web`]), not by this module.
pub const HTTP_PORT: u16 = 8003;
/// The TCP services every proxy candidate forwards, by name.
pub const TCP_SERVICES: [(&str, u16); 3] = [
    ("echo", ECHO_PORT),
    ("sink", SINK_PORT),
    ("http", HTTP_PORT),
];
/// Where svcproxy's transparent listeners listen (the `-tproxy` candidates).
pub const TRANSPARENT_PORT: u16 = 10263;

pub struct Backends {
    pub sunk: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Backends {
    pub fn start(ns: Option<&'static str>, ips: &[IpAddr]) -> io::Result<Self> {
        let sunk = Arc::new(AtomicU64::new(0));
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        let ips = ips.to_vec();
        let counter = sunk.clone();
        let thread = std::thread::spawn(move || {
            let setup = || -> io::Result<tokio::runtime::Runtime> {
                crate::topo::enter(ns)?;
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            };
            let rt = match setup() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for ip in ips {
                    let bound = async {
                        Ok::<_, io::Error>((
                            TcpListener::bind(SocketAddr::new(ip, ECHO_PORT)).await?,
                            TcpListener::bind(SocketAddr::new(ip, SINK_PORT)).await?,
                            UdpSocket::bind(SocketAddr::new(ip, UDP_PORT)).await?,
                        ))
                    }
                    .await;
                    let (echo, sink, udp) = match bound {
                        Ok(b) => b,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    tasks.push(tokio::spawn(echo_server(echo)));
                    tasks.push(tokio::spawn(sink_server(sink, counter.clone())));
                    tasks.push(tokio::spawn(udp_echo(udp)));
                }
                let _ = ready_tx.send(Ok(()));
                let _ = stop_rx.await;
                for t in tasks {
                    t.abort();
                }
            });
        });
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("backend thread died"))??;
        Ok(Self {
            sunk,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn echo_server(listener: TcpListener) {
    while let Ok((mut s, _)) = listener.accept().await {
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 << 10];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
}

async fn sink_server(listener: TcpListener, sunk: Arc<AtomicU64>) {
    while let Ok((mut s, _)) = listener.accept().await {
        let sunk = sunk.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 << 10];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sunk.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
    }
}

/// Receive buffer of the UDP echo servers. The default (`net.core.rmem_default`, 208 KiB) holds
/// fewer than the 512 datagrams the UDP load keeps in flight, so bursts overflowed the servers'
/// own sockets (counted as `UdpRcvbufErrors` in the backend namespace) and the harness measured
/// its servers' loss as the candidates'. The kernel caps this at `net.core.rmem_max`.
const UDP_RECV_BUFFER: usize = 4 << 20;

async fn udp_echo(socket: UdpSocket) {
    let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(UDP_RECV_BUFFER);
    let mut buf = vec![0u8; 65_536];
    while let Ok((n, from)) = socket.recv_from(&mut buf).await {
        let _ = socket.send_to(&buf[..n], from).await;
    }
}
