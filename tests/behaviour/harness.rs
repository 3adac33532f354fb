//! Test plumbing: backends on loopback that stop and join when dropped, unique service
//! addresses, a proxy per test, and clients with timeouts (so a broken proxy fails a test
//! instead of hanging it).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use svcproxy::{
    BackendKind, Batch, Endpoint, Options, Protocol, Proxy, ProxyConfig, Service, ServicePort,
    Table,
};

/// Read and write timeout of every test socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

static SERIAL: RwLock<()> = RwLock::new(());

/// Tests run in parallel; the descriptor-counting test needs the process to itself.
pub fn shared() -> RwLockReadGuard<'static, ()> {
    SERIAL.read().unwrap_or_else(|e| e.into_inner())
}

/// Exclusive use of the process (no other test running).
pub fn exclusive() -> RwLockWriteGuard<'static, ()> {
    SERIAL.write().unwrap_or_else(|e| e.into_inner())
}

static NEXT_IP: AtomicU32 = AtomicU32::new(1);

/// A loopback address no other test of this binary uses: 127.<suite>.x.y.
pub fn service_ip(suite: u8) -> IpAddr {
    let n = NEXT_IP.fetch_add(1, Ordering::Relaxed);
    IpAddr::V4(Ipv4Addr::new(127, suite, (n >> 8) as u8, n as u8))
}

/// A port free on the wildcard address right now (for wildcard listeners).
pub fn free_port(protocol: Protocol) -> u16 {
    match protocol {
        Protocol::Tcp => TcpListener::bind("0.0.0.0:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(),
        Protocol::Udp => UdpSocket::bind("0.0.0.0:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(),
    }
}

/// A TCP backend: `handler` runs on its own thread per connection.
pub struct TcpServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    handlers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TcpServer {
    pub fn spawn(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let handlers: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let handler = Arc::new(handler);
        let acceptor = {
            let (stop, handlers) = (stop.clone(), handlers.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                    let handler = handler.clone();
                    let t = std::thread::spawn(move || handler(stream));
                    let mut hs = handlers.lock().unwrap();
                    hs.retain(|h| !h.is_finished());
                    hs.push(t);
                }
            })
        };
        Self {
            addr,
            stop,
            acceptor: Some(acceptor),
            handlers,
        }
    }

    /// Answers each connection with its own address on a line, then echoes until EOF.
    pub fn identify() -> Self {
        Self::spawn(|mut s| {
            let me = s.local_addr().unwrap();
            if writeln!(s, "{me}").is_err() {
                return;
            }
            let mut buf = [0u8; 16 << 10];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = s.shutdown(Shutdown::Write);
        })
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::new(self.addr)
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        for t in self.handlers.lock().unwrap().drain(..) {
            let _ = t.join();
        }
    }
}

/// A UDP backend that answers each datagram with "<its address>|<payload>".
pub struct UdpServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpServer {
    pub fn echo() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Room for many large datagrams at once (tests send up to 64 KiB ones concurrently).
        socket2::SockRef::from(&socket)
            .set_recv_buffer_size(4 << 20)
            .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::SeqCst) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let mut reply = format!("{addr}|").into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    if reply.len() > 65_507 {
                        reply = buf[..n].to_vec();
                    }
                    let _ = socket.send_to(&reply, from);
                }
            })
        };
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::new(self.addr)
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

static ADJUST: std::sync::OnceLock<fn(&mut ProxyConfig)> = std::sync::OnceLock::new();

/// Makes [`config`] apply `adjust` (once per test binary: one suite, one variant).
pub fn adjust_configs(adjust: fn(&mut ProxyConfig)) {
    let _ = ADJUST.set(adjust);
}

/// Test settings: two workers, short connect timeouts, and the suite's adjustment.
pub fn config() -> ProxyConfig {
    let mut c = ProxyConfig {
        workers: 2,
        ..ProxyConfig::default()
    };
    c.tcp.connect_timeout = Duration::from_millis(500);
    if let Some(adjust) = ADJUST.get() {
        adjust(&mut c);
    }
    c
}

pub fn start(backend: BackendKind, table: &Arc<Table>, config: ProxyConfig) -> Proxy {
    // Logs when debugging: RUST_LOG=svcproxy_uring=debug cargo test ...
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    Proxy::start(table.clone(), Options { backend, config }).expect("proxy starts")
}

/// A one-port service named `name` on `ip:port`.
pub fn service(name: &str, ip: IpAddr, port: u16, protocol: Protocol) -> Service {
    Service::new(name)
        .address(ip)
        .port(ServicePort::new(protocol, port))
}

/// Publishes `service` with `endpoints` and waits until `proxy` applied it.
pub fn publish(proxy: &Proxy, service: Service, endpoints: Vec<Endpoint>) {
    let name = service.name.clone();
    proxy
        .table()
        .apply(
            Batch::new()
                .upsert(service)
                .replace_endpoints(name, endpoints),
        )
        .unwrap();
    proxy.sync(IO_TIMEOUT).unwrap();
}

/// Replaces a service's endpoints and waits until the proxy applied it.
pub fn set_endpoints(proxy: &Proxy, name: &str, endpoints: Vec<Endpoint>) {
    proxy
        .table()
        .apply(Batch::new().replace_endpoints(name, endpoints))
        .unwrap();
    proxy.sync(IO_TIMEOUT).unwrap();
}

pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Connects from a chosen source IP.
pub fn connect_from(source: IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::new(source, 0).into())?;
    s.connect_timeout(&addr.into(), IO_TIMEOUT)?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// The first line an `identify` backend sends: which backend answered.
pub fn who(stream: &TcpStream) -> io::Result<SocketAddr> {
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    line.trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad identity {line:?}")))
}

/// Which backend answers a new connection to `addr`.
pub fn who_answers(addr: SocketAddr) -> io::Result<SocketAddr> {
    let s = connect(addr)?;
    who(&s)
}

/// A UDP client socket connected to `service`: it accepts datagrams from that address only.
pub fn udp_client(service: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.connect(service).unwrap();
    s
}

/// Sends `payload` and returns (backend address, echoed payload).
pub fn udp_ask(client: &UdpSocket, payload: &[u8]) -> io::Result<(SocketAddr, Vec<u8>)> {
    client.send(payload)?;
    let mut buf = vec![0u8; 70_000];
    let n = client.recv(&mut buf)?;
    let reply = &buf[..n];
    let bar = reply
        .iter()
        .position(|&b| b == b'|')
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no backend tag"))?;
    let from = std::str::from_utf8(&reply[..bar]).unwrap().parse().unwrap();
    Ok((from, reply[bar + 1..].to_vec()))
}

/// Descriptors open in this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Waits until `condition` holds, for counters that are updated just after the traffic they
/// count (there is no event to wait for). Fails the test after [`IO_TIMEOUT`].
pub fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: condition not reached"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
