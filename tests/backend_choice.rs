//! Which backend runs: `Auto` takes io_uring where the kernel allows it and falls back to epoll
//! where it does not. The fallback is forced in a child process (the switch is read from the
//! environment, which a test must not change in its own, multi-threaded, process).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use svcproxy::{
    BackendKind, Batch, DISABLE_IO_URING, Endpoint, Error, Options, Proxy, Service, ServicePort,
    Table,
};

const CHILD: &str = "SVCPROXY_TEST_CHILD";

/// A proxy on a fresh loopback port in front of a backend that answers "pong".
fn proxy(backend: BackendKind) -> Result<(Proxy, SocketAddr), Error> {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = server.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in server.incoming().flatten().take(1) {
            let mut s = s;
            let _ = s.write_all(b"pong");
        }
    });
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let vip = SocketAddr::from(([127, 0, 0, 1], port));
    let table = Arc::new(Table::default());
    let svc = Service::new("choice")
        .address(vip.ip())
        .port(ServicePort::tcp(port));
    table
        .apply(
            Batch::new()
                .upsert(svc)
                .replace_endpoints("choice", vec![Endpoint::new(endpoint)]),
        )
        .unwrap();
    let options = Options {
        backend,
        ..Options::default()
    };
    Proxy::start(table, options).map(|p| (p, vip))
}

fn pong(vip: SocketAddr) -> String {
    let mut s = TcpStream::connect(vip).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = String::new();
    BufReader::new(&mut s).read_line(&mut line).unwrap();
    line
}

#[test]
fn auto_takes_io_uring_where_available() {
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    let (proxy, vip) = proxy(BackendKind::Auto).unwrap();
    let want = if svcproxy::io_uring_available().is_ok() {
        BackendKind::IoUring
    } else {
        BackendKind::Epoll
    };
    assert_eq!(proxy.backend(), want);
    assert_eq!(pong(vip), "pong");
}

/// Runs this test binary's `test` in a child with io_uring switched off; returns its output.
fn in_child_without_io_uring(test: &str) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env(DISABLE_IO_URING, "1")
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "child failed:\n{text}");
    text
}

#[test]
fn auto_falls_back_to_epoll_where_io_uring_is_unavailable() {
    if std::env::var_os(CHILD).is_none() {
        let out =
            in_child_without_io_uring("auto_falls_back_to_epoll_where_io_uring_is_unavailable");
        assert!(out.contains("CHILD-CHOSE Epoll"), "{out}");
        return;
    }
    let why = svcproxy::io_uring_available().unwrap_err();
    assert!(why.contains(DISABLE_IO_URING), "{why}");
    let (proxy, vip) = proxy(BackendKind::Auto).unwrap();
    assert_eq!(pong(vip), "pong", "the fallback forwards traffic");
    println!("CHILD-CHOSE {:?}", proxy.backend());
}

#[test]
fn asking_for_io_uring_where_unavailable_is_a_clear_error() {
    if std::env::var_os(CHILD).is_none() {
        let out =
            in_child_without_io_uring("asking_for_io_uring_where_unavailable_is_a_clear_error");
        assert!(
            out.contains("CHILD-ERROR invalid option: io_uring backend: disabled by"),
            "{out}"
        );
        return;
    }
    let err = proxy(BackendKind::IoUring).unwrap_err();
    println!("CHILD-ERROR {err}");
}
