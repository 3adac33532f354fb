//! Logs never carry payload bytes: with every event enabled (trace level) and TCP and UDP
//! traffic through each backend, including failures that do get logged, the captured log holds
//! no trace of a marker payload, neither as text nor as a formatted byte slice.
//!
//! One test in its own binary: it installs the process-wide log subscriber.

mod behaviour;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

use behaviour::echo_server;
use behaviour::harness::*;
use svcproxy::{BackendKind, Endpoint, Protocol, Table};

const MARKER: &[u8] = b"SECRET-PAYLOAD-7f3a91";

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn traffic(backend: BackendKind) {
    let tcp = echo_server();
    let udp = UdpServer::echo();
    // A closed port among the endpoints: failed connects and refused datagrams get logged.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = start(backend, &Arc::new(Table::default()), config());
    let ip = service_ip(120);
    publish(
        &proxy,
        service("logs-tcp", ip, 80, Protocol::Tcp),
        vec![tcp.endpoint(), Endpoint::new(closed)],
    );
    publish(
        &proxy,
        service("logs-udp", ip, 53, Protocol::Udp),
        vec![udp.endpoint()],
    );
    for _ in 0..4 {
        let mut s = connect(SocketAddr::new(ip, 80)).unwrap();
        s.write_all(MARKER).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut echo = Vec::new();
        s.read_to_end(&mut echo).unwrap();
        assert_eq!(echo, MARKER);
    }
    let client = udp_client(SocketAddr::new(ip, 53));
    assert_eq!(udp_ask(&client, MARKER).unwrap().1, MARKER);
    set_endpoints(&proxy, "logs-udp", vec![Endpoint::new(closed)]);
    client.send(MARKER).unwrap();
    proxy.shutdown(IO_TIMEOUT).unwrap();
}

#[test]
fn logs_never_contain_payload_bytes() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    traffic(BackendKind::Epoll);
    if svcproxy::io_uring_available().is_ok() {
        traffic(BackendKind::IoUring);
    }
    let log = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    assert!(
        log.contains("connect"),
        "the traffic produced no connect log, so this test checks nothing:\n{log}"
    );
    let text = String::from_utf8_lossy(MARKER);
    let debug = format!("{MARKER:?}");
    let numbers = &debug[1..debug.len() - 1];
    let hex: String = MARKER.iter().map(|b| format!("{b:02x}")).collect();
    for form in [&text[..], numbers, &hex] {
        assert!(!log.contains(form), "the log holds payload bytes ({form})");
    }
}
