//! A deliberately small HTTP/1.1 server for the admin endpoint: one request per connection
//! (`Connection: close`), `Content-Length` bodies only, and hard limits, because an admin port
//! must not be a way to exhaust the proxy: at most [`MAX_CONNECTIONS`] connections at once,
//! [`MAX_HEAD`] bytes of request line and headers,
//! [`MAX_BODY`] bytes of body, and one deadline for reading the whole request (a per-read
//! timeout alone would let a client keep a slot by sending a byte now and then). When every
//! slot is taken, the connection that has waited longest for its request is cut off to make
//! room, so idle clients cannot keep a health probe (which sends its request at once) out.
//! General HTTP servers do not offer these limits together, and the admin API needs no more.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use svcproxy::core::Backoff;
use tracing::debug;

/// Connections served at once (more are answered 503 only while all are being answered).
pub const MAX_CONNECTIONS: usize = 16;
/// Request line and headers.
pub const MAX_HEAD: usize = 16 << 10;
/// Request body.
pub const MAX_BODY: usize = 1 << 20;
/// Time to read a whole request, and to write each part of a response.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A request.
#[derive(Debug)]
pub struct Request {
    /// Method, upper case.
    pub method: String,
    /// Path, without the query.
    pub path: String,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// The peer.
    pub peer: SocketAddr,
}

impl Request {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A response.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Content type.
    pub content_type: &'static str,
    /// Body.
    pub body: Vec<u8>,
}

impl Response {
    /// A JSON response.
    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: format!("{value}\n").into_bytes(),
        }
    }

    /// An error as JSON: `{"error": "..."}`.
    pub fn error(status: u16, message: impl std::fmt::Display) -> Self {
        Self::json(status, &serde_json::json!({ "error": message.to_string() }))
    }

    /// Plain text.
    pub fn text(status: u16, content_type: &'static str, body: String) -> Self {
        Self {
            status,
            content_type,
            body: body.into_bytes(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// A running server; stops (and joins its threads) when dropped. Stopping closes its
/// descriptor of the listening socket and never shuts the socket down, so a socket handed to
/// another process ([`Server::listener`]) goes on there.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    listener: TcpListener,
    thread: Option<JoinHandle<()>>,
}

/// How often the acceptor looks at the stop flag while no client comes.
const STOP_CHECK: Duration = Duration::from_millis(100);

impl Server {
    /// Serves `handler` on `addr`.
    pub fn start(
        addr: SocketAddr,
        handler: impl Fn(&Request) -> Response + Send + Sync + 'static,
    ) -> io::Result<Self> {
        Self::start_on(TcpListener::bind(addr)?, handler)
    }

    /// Serves `handler` on `listener` (one handed over by another process, say).
    pub fn start_on(
        listener: TcpListener,
        handler: impl Fn(&Request) -> Response + Send + Sync + 'static,
    ) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        // The acceptor waits with poll(2), looking at the stop flag in between: stopping
        // needs no new descriptor (stopping must work when descriptors have run out) and
        // no shutdown(2) of a socket that may be shared.
        listener.set_nonblocking(true)?;
        let handle = listener.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let handler = Arc::new(handler);
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("svcproxyd-admin".into())
                .spawn(move || {
                    let mut slots: Vec<Slot> = Vec::new();
                    let mut backoff = Backoff::default();
                    while !stop.load(Ordering::SeqCst) {
                        let mut stream = match listener.accept() {
                            Ok((s, _)) => s,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                wait_readable(&listener);
                                continue;
                            }
                            Err(e) => {
                                // Out of descriptors, accept fails at once until some are
                                // back: wait instead of spinning.
                                debug!(error = %e, "admin accept failed");
                                std::thread::sleep(backoff.fail());
                                continue;
                            }
                        };
                        backoff.succeed();
                        slots.retain(|s| !s.thread.is_finished());
                        if slots.len() >= MAX_CONNECTIONS && !evict_slowest(&slots) {
                            let _ = respond(
                                &mut stream,
                                &Response::error(503, "too many admin connections"),
                            );
                            continue;
                        }
                        let Ok(handle) = stream.try_clone() else {
                            continue;
                        };
                        let reading = Arc::new(Mutex::new(Some(handle)));
                        let handler = handler.clone();
                        let cut = reading.clone();
                        let thread =
                            std::thread::spawn(move || serve(&mut stream, &*handler, &cut));
                        slots.push(Slot {
                            since: Instant::now(),
                            reading,
                            thread,
                        });
                    }
                    for s in slots {
                        cut_off(&s.reading);
                        let _ = s.thread.join();
                    }
                })?
        };
        Ok(Self {
            addr,
            stop,
            listener: handle,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listening socket (to hand over).
    pub fn listener(&self) -> &TcpListener {
        &self.listener
    }
}

/// Waits until `listener` has a client, or [`STOP_CHECK`] has passed.
fn wait_readable(listener: &TcpListener) {
    let mut fds = [rustix::event::PollFd::new(
        listener,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: STOP_CHECK.as_nanos() as i64,
    };
    let _ = rustix::event::poll(&mut fds, Some(&timeout));
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A connection being served.
struct Slot {
    since: Instant,
    /// While its request is being read: the same socket, to cut a slow client off.
    reading: Reading,
    thread: JoinHandle<()>,
}

type Reading = Arc<Mutex<Option<TcpStream>>>;

fn lock(reading: &Reading) -> MutexGuard<'_, Option<TcpStream>> {
    reading.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Cuts a connection off if its request is still being read.
fn cut_off(reading: &Reading) -> bool {
    match lock(reading).take() {
        Some(stream) => {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            true
        }
        None => false,
    }
}

/// Makes room for a new connection by cutting off the one that has waited longest for its
/// request to arrive; false if every connection is past that (being answered).
fn evict_slowest(slots: &[Slot]) -> bool {
    let mut waiting: Vec<&Slot> = slots
        .iter()
        .filter(|s| lock(&s.reading).is_some())
        .collect();
    waiting.sort_by_key(|s| s.since);
    let evicted = waiting.iter().any(|s| cut_off(&s.reading));
    if evicted {
        debug!("admin connection cut off: its request had not arrived");
    }
    evicted
}

fn serve(
    stream: &mut TcpStream,
    handler: &(dyn Fn(&Request) -> Response + Send + Sync),
    reading: &Reading,
) {
    let _ = stream.set_write_timeout(Some(TIMEOUT));
    let peer = match stream.peer_addr() {
        Ok(p) => p,
        Err(_) => return,
    };
    let mut input = Deadline {
        stream,
        until: Instant::now() + TIMEOUT,
    };
    let request = read_request(&mut input, peer);
    // Read: no longer to be cut off (and the socket closes when this connection ends).
    lock(reading).take();
    let response = match request {
        Ok(request) => handler(&request),
        Err(response) => response,
    };
    if let Err(e) = respond(stream, &response) {
        debug!(error = %e, "admin response not sent");
    }
}

/// Reads from a connection until one deadline for the whole request.
struct Deadline<'a> {
    stream: &'a TcpStream,
    until: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the request took too long to arrive",
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut stream = self.stream;
        stream.read(buf)
    }
}

/// The response to a failed read: 408 if it timed out, 400 otherwise.
fn read_failed(what: &str, e: &io::Error) -> Response {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            Response::error(408, format!("{what}: the request took too long to arrive"))
        }
        _ => Response::error(400, format!("{what}: {e}")),
    }
}

/// Reads one request from `input` (sent by `peer`), within the limits; an error is the
/// response to send instead.
pub fn read_request(input: &mut impl Read, peer: SocketAddr) -> Result<Request, Response> {
    let mut reader = BufReader::new(input.take(MAX_HEAD as u64));
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| read_failed("head", &e))?;
        if n == 0 {
            return Err(Response::error(431, "request head too large or truncated"));
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
        head.push(line.trim_end().to_string());
    }
    let mut lines = head.into_iter();
    let request_line = lines
        .next()
        .ok_or_else(|| Response::error(400, "empty request"))?;
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(Response::error(400, "malformed request line"));
    };
    let path = target.split('?').next().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            Some((n.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse::<usize>())
        .transpose()
        .map_err(|_| Response::error(400, "bad Content-Length"))?
        .unwrap_or(0);
    if headers.iter().any(|(n, _)| n == "transfer-encoding") {
        return Err(Response::error(
            400,
            "chunked bodies are not supported; send Content-Length",
        ));
    }
    if length > MAX_BODY {
        return Err(Response::error(
            413,
            format!("body of {length} bytes, at most {MAX_BODY}"),
        ));
    }
    // What the buffered reader already holds, then the rest from the socket.
    let mut body = Vec::with_capacity(length);
    let buffered = reader.buffer().len().min(length);
    body.extend_from_slice(&reader.buffer()[..buffered]);
    let input = reader.into_inner().into_inner();
    let mut rest = vec![0; length - buffered];
    input
        .read_exact(&mut rest)
        .map_err(|e| read_failed("body", &e))?;
    body.extend_from_slice(&rest);
    Ok(Request {
        method: method.to_ascii_uppercase(),
        path,
        headers,
        body,
        peer,
    })
}

fn respond(stream: &mut TcpStream, r: &Response) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(&r.body)?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_server() -> Server {
        Server::start(SocketAddr::from(([127, 0, 0, 1], 0)), |_| {
            Response::text(200, "text/plain", "ok".into())
        })
        .unwrap()
    }

    /// Sends `request` on a new connection and returns the response's status.
    fn status(addr: SocketAddr, request: &[u8]) -> u16 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        // The server may answer (and close) before it has read everything.
        let _ = s.write_all(request);
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        reply
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {reply:?}"))
    }

    const GET: &[u8] = b"GET /healthz HTTP/1.1\r\n\r\n";

    #[test]
    fn idle_connections_cannot_keep_a_request_out() {
        let server = ok_server();
        // Connections that send nothing hold every slot. The acceptor takes connections in
        // order, so once it answers the next one, all of these have been counted.
        let mut held: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(server.addr()).unwrap())
            .collect();
        assert_eq!(status(server.addr(), GET), 200, "a probe is served");
        // To make room, the oldest idle connection was cut off.
        let oldest = &mut held[0];
        oldest.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut rest = Vec::new();
        assert_eq!(oldest.read_to_end(&mut rest).unwrap_or(0), 0, "{rest:?}");
        for _ in 0..3 * MAX_CONNECTIONS {
            held.push(TcpStream::connect(server.addr()).unwrap());
        }
        assert_eq!(status(server.addr(), GET), 200, "still, after many more");
    }

    #[test]
    fn connections_past_the_limit_are_answered_503_while_all_are_being_answered() {
        let (entered, entries) = std::sync::mpsc::channel();
        let release = Arc::new(std::sync::Barrier::new(MAX_CONNECTIONS + 1));
        let server = {
            let (entered, release) = (std::sync::Mutex::new(entered), release.clone());
            Server::start(SocketAddr::from(([127, 0, 0, 1], 0)), move |_| {
                entered.lock().unwrap().send(()).unwrap();
                release.wait();
                Response::text(200, "text/plain", "ok".into())
            })
            .unwrap()
        };
        let addr = server.addr();
        let busy: Vec<_> = (0..MAX_CONNECTIONS)
            .map(|_| std::thread::spawn(move || status(addr, GET)))
            .collect();
        for _ in 0..MAX_CONNECTIONS {
            entries.recv_timeout(TIMEOUT).unwrap();
        }
        assert_eq!(status(addr, GET), 503);
        release.wait();
        for b in busy {
            assert_eq!(b.join().unwrap(), 200);
        }
    }

    #[test]
    fn a_request_trickled_past_the_deadline_is_answered_408() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server_side, peer) = listener.accept().unwrap();
        // A byte every 50 ms: each read succeeds well within any per-read timeout, and the
        // head never ends (if it were read to EOF, the answer would be 431, not 408).
        let trickle = std::thread::spawn(move || {
            for b in b"GET /healthz HTTP/1.1\r\nX-Slow: "
                .iter()
                .cycle()
                .take(200)
            {
                if client.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let mut input = Deadline {
            stream: &server_side,
            until: Instant::now() + Duration::from_millis(300),
        };
        let refused = read_request(&mut input, peer).unwrap_err();
        assert_eq!(refused.status, 408);
        drop(server_side);
        trickle.join().unwrap();
    }

    #[test]
    fn heads_and_bodies_past_the_limits_are_refused() {
        let server = ok_server();
        let mut big_head = b"GET /healthz HTTP/1.1\r\nX-Fill: ".to_vec();
        big_head.resize(MAX_HEAD + 1, b'a');
        big_head.extend_from_slice(b"\r\n\r\n");
        assert_eq!(status(server.addr(), &big_head), 431);
        let big_body = format!(
            "PUT /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(status(server.addr(), big_body.as_bytes()), 413);
        let chunked = b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(status(server.addr(), chunked), 400);
        assert_eq!(status(server.addr(), GET), 200, "the server still serves");
    }
}
