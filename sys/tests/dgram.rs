//! Datagram batches: the local address a client sent to is reported, and replies sent from it
//! reach a client that only accepts datagrams from that address.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use svcproxy_core::{Protocol, ServicePortKey};
use svcproxy_sys::{ListenOptions, RecvBatch, listen, send_many};

fn wait_readable(socket: &socket2::Socket) {
    let mut fds = [rustix::event::PollFd::new(
        socket,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::event::Timespec {
        tv_sec: 5,
        tv_nsec: 0,
    };
    rustix::event::poll(&mut fds, Some(&timeout)).unwrap();
}

#[test]
fn wildcard_listener_reports_the_local_address_and_replies_from_it() {
    // Port: let the kernel choose one on the wildcard address, then serve it.
    let probe = UdpSocket::bind("0.0.0.0:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let key = ServicePortKey::new(SocketAddr::from(([0, 0, 0, 0], port)), Protocol::Udp);
    let listener = listen(key, &ListenOptions::default(), false).unwrap();

    let service: SocketAddr = SocketAddr::from(([127, 0, 0, 77], port));
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.connect(service).unwrap();
    let big = vec![0xa5u8; 60 * 1024];
    client.send(b"hello").unwrap();
    client.send(&big).unwrap();

    let mut batch = RecvBatch::new(8, 65_536);
    let mut got = Vec::new();
    while got.len() < 2 {
        wait_readable(&listener);
        batch.recv(&listener).unwrap();
        for i in 0..batch.len() {
            let d = batch.get(i);
            assert_eq!(d.peer, Some(client.local_addr().unwrap()));
            assert_eq!(d.destination.local, Some(IpAddr::from([127, 0, 0, 77])));
            assert!(!d.truncated);
            got.push(d.data.to_vec());
        }
    }
    assert_eq!(got[0], b"hello");
    assert_eq!(got[1], big, "a 60 KiB datagram arrives whole");

    // Reply from the service address: the connected client accepts only that source.
    let sent = send_many(
        &listener,
        &[b"one", b"two"],
        Some(client.local_addr().unwrap()),
        Some(service.ip()),
    )
    .unwrap();
    assert_eq!(sent, 2);
    let mut buf = [0u8; 16];
    let n = client.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"one");
    let n = client.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"two");
}

#[test]
fn truncation_is_reported() {
    let key = ServicePortKey::new("127.0.0.1:0".parse().unwrap(), Protocol::Udp);
    let listener = listen(key, &ListenOptions::default(), false).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.send_to(&[1u8; 100], addr).unwrap();
    let mut batch = RecvBatch::new(1, 10);
    wait_readable(&listener);
    assert_eq!(batch.recv(&listener).unwrap(), 1);
    let d = batch.get(0);
    assert!(d.truncated);
    assert_eq!(d.data.len(), 10);
}

#[test]
fn ipv6_reports_the_local_address_and_replies_from_it() {
    let key = ServicePortKey::new("[::]:0".parse().unwrap(), Protocol::Udp);
    let listener = listen(key, &ListenOptions::default(), false).unwrap();
    let port = listener.local_addr().unwrap().as_socket().unwrap().port();
    let service: SocketAddr = SocketAddr::new("::1".parse().unwrap(), port);
    let client = UdpSocket::bind("[::1]:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.connect(service).unwrap();
    client.send(b"six").unwrap();
    let mut batch = RecvBatch::new(4, 2048);
    wait_readable(&listener);
    assert_eq!(batch.recv(&listener).unwrap(), 1);
    let d = batch.get(0);
    assert_eq!(d.peer, Some(client.local_addr().unwrap()));
    assert_eq!(d.destination.local, Some(service.ip()));
    let sent = send_many(&listener, &[b"back"], d.peer, Some(service.ip())).unwrap();
    assert_eq!(sent, 1);
    let mut buf = [0u8; 16];
    let n = client.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"back");
}
