//! Splicing through a pipe moves bytes between sockets intact and reports end of stream.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use svcproxy_sys::Pipe;

#[test]
fn splice_moves_bytes_and_sees_eof() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (src, _) = l.accept().unwrap();
    let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
    let dst = TcpStream::connect(l2.local_addr().unwrap()).unwrap();
    let (mut b, _) = l2.accept().unwrap();

    let pipe = Pipe::new(1 << 16).unwrap();
    assert!(pipe.capacity() >= 1 << 16);
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
    let writer = {
        let payload = payload.clone();
        std::thread::spawn(move || {
            a.write_all(&payload).unwrap();
            a.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        got
    });
    // Blocking-style loop for the test: src and dst are blocking sockets, the pipe is not.
    let mut held = 0;
    loop {
        match pipe.fill(&src, pipe.capacity() - held) {
            Ok(0) => break,
            Ok(n) => held += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        while held > 0 {
            held -= pipe.drain(&dst, held).unwrap();
        }
    }
    dst.shutdown(std::net::Shutdown::Write).unwrap();
    writer.join().unwrap();
    assert_eq!(reader.join().unwrap(), payload);
}
