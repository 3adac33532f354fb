//! Restarts and upgrades that drop nothing: a running svcproxyd hands its sockets, UDP flows,
//! table generation, counters, HTTP listeners and capture to a new one, over a Unix socket
//! (`[upgrade] socket`, `--upgrade-socket`; mode 0600, peers of another user refused).
//!
//! The exchange, each message one `SOCK_SEQPACKET` record of JSON with descriptors beside it
//! ([`svcproxy_sys::fd_passing`]):
//! 1. new -> old: `hello` (protocol version, release, worker count).
//! 2. old -> new: `refused` with the reason (nothing changes: another protocol version, or
//!    another worker count), or `offer` (the HTTP listeners attached, the length of the state
//!    and how many socket records follow), then the state (generation, counters, capture: as
//!    JSON in parts of [`STATE_PART`] bytes, so that no message outgrows the socket's buffer
//!    however large the table), then `sockets` batches of at most [`MAX_FDS`] descriptors.
//!    Before the offer, the old process's workers stop receiving UDP and export their
//!    sockets (see `svcproxy_core::handover`); TCP is served all along.
//! 3. The new process publishes its table, starts its workers on the sockets (each frontend
//!    it serves adopts the inherited socket, so no client is refused), serves its HTTP
//!    endpoints on the inherited listeners, takes the capture over as it is, and sends
//!    `ready`.
//! 4. The old process retires (accepts and receives nothing more, and waits until no accept
//!    of its is in flight), sends `done`, leaves its capture in place, stops its HTTP
//!    endpoints (without ending their sockets), lets its TCP connections finish (the shutdown
//!    grace) and exits 0. The new one serves once it has `done`, and owns the capture from
//!    then on.
//!
//! If the new process goes away or stays silent before `ready`, or `done` cannot be sent, the
//! old one serves on as if nothing had happened; a new process without `done` exits 1
//! (unless the old one is gone), leaving the capture in place. When nothing answers at the
//! socket, a new process starts cold.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use svcproxy::core::handover::{HandedFlow, WorkerSockets};
use svcproxy::core::{CounterValues, FlowKey, PortStats, Protocol, ServicePortKey};
use svcproxy::{Proxy, Table};
use svcproxy_sys::fd_passing::{Channel, ChannelListener, MAX_FDS};
use tracing::info;

use crate::capture::CaptureState;

/// The version of this exchange; both processes must speak the same.
pub const PROTOCOL: u32 = 1;
/// How long each message may take.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the new process may take from the last socket to `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the workers may take to export their sockets, or to retire.
pub const WORKERS_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of the state per message.
pub const STATE_PART: usize = 64 << 10;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Message {
    Hello {
        protocol: u32,
        release: String,
        workers: usize,
    },
    Refused {
        reason: String,
    },
    Offer {
        protocol: u32,
        release: String,
        /// The HTTP endpoints' names, their listeners attached in this order.
        http: Vec<String>,
        /// Bytes of [`State`] that follow.
        state: usize,
        records: usize,
    },
    Sockets {
        records: Vec<Record>,
    },
    Ready,
    Done,
}

/// One handed socket, its descriptor attached in the same position.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Record {
    Listener {
        worker: usize,
        key: ServicePortKey,
    },
    Flow {
        worker: usize,
        client: SocketAddr,
        local: SocketAddr,
        listener: ServicePortKey,
        endpoint: SocketAddr,
        idle_ms: u64,
        replied: bool,
    },
}

/// What the old process's table and capture hold.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    generation: u64,
    stats: Vec<Stats>,
    capture: Option<CaptureState>,
}

/// A service port's counters on the way.
#[derive(Debug, Serialize, Deserialize)]
struct Stats {
    service: String,
    port: String,
    protocol: String,
    totals: CounterValues,
    endpoints: Vec<(SocketAddr, CounterValues)>,
}

impl From<PortStats> for Stats {
    fn from(s: PortStats) -> Self {
        Self {
            service: s.service,
            port: s.port,
            protocol: s.protocol.to_string(),
            totals: s.totals,
            endpoints: s.endpoints,
        }
    }
}

impl Stats {
    fn into_port_stats(self) -> Option<PortStats> {
        Some(PortStats {
            service: self.service,
            port: self.port,
            protocol: self.protocol.parse::<Protocol>().ok()?,
            totals: self.totals,
            endpoints: self.endpoints,
        })
    }
}

fn send(channel: &Channel, message: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), String> {
    let bytes = serde_json::to_vec(message).map_err(|e| e.to_string())?;
    channel
        .send(&bytes, fds)
        .map_err(|e| format!("sending: {e}"))
}

fn recv(channel: &Channel) -> Result<(Message, Vec<OwnedFd>), String> {
    let (bytes, fds) = channel.recv().map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock => "no answer in time".to_string(),
        io::ErrorKind::UnexpectedEof => "the other svcproxyd went away".to_string(),
        _ => format!("receiving: {e}"),
    })?;
    let message = serde_json::from_slice(&bytes).map_err(|e| format!("a bad message: {e}"))?;
    Ok((message, fds))
}

/// What a new process received from the one it takes over from.
pub struct Inheritance {
    channel: Channel,
    /// The old process's pid (`None`: in a process namespace this one does not see).
    pub from: Option<u32>,
    /// The old table's generation (the new one goes on from it).
    pub generation: u64,
    /// The old counters.
    pub stats: Vec<PortStats>,
    /// The old capture, to adopt.
    pub capture: Option<CaptureState>,
    /// The old HTTP listeners, by endpoint name.
    http: Vec<(String, TcpListener)>,
    /// The old workers' sockets, by worker.
    pub sockets: Vec<WorkerSockets>,
}

/// Asks the svcproxyd at `path` for its sockets. `Ok(None)` when none answers there (a cold
/// start); `Err` when one answered and refused, or failed (it serves on).
pub fn take_over(path: &Path, workers: usize) -> Result<Option<Inheritance>, String> {
    let channel = match Channel::connect(path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    channel
        .set_timeout(MESSAGE_TIMEOUT)
        .map_err(|e| e.to_string())?;
    let from = channel.peer_pid().ok().flatten();
    send(
        &channel,
        &Message::Hello {
            protocol: PROTOCOL,
            release: env!("CARGO_PKG_VERSION").into(),
            workers,
        },
        &[],
    )?;
    let (offer, http_fds) = recv(&channel)?;
    let (names, length, records, release) = match offer {
        Message::Offer {
            protocol: PROTOCOL,
            release,
            http,
            state,
            records,
        } => (http, state, records, release),
        Message::Offer { protocol, .. } => {
            return Err(format!(
                "the running svcproxyd speaks handover protocol version {protocol}, this one {PROTOCOL}"
            ));
        }
        Message::Refused { reason } => return Err(format!("refused: {reason}")),
        other => return Err(format!("unexpected {other:?}")),
    };
    if names.len() != http_fds.len() {
        return Err("the HTTP listeners do not match their names".into());
    }
    let http = names
        .into_iter()
        .zip(http_fds)
        .map(|(name, fd)| (name, TcpListener::from(fd)))
        .collect();
    let mut state = Vec::new();
    while state.len() < length {
        let (part, fds) = channel
            .recv()
            .map_err(|e| format!("receiving the state: {e}"))?;
        if part.is_empty() || !fds.is_empty() || state.len() + part.len() > length {
            return Err("the state does not match its length".into());
        }
        state.extend(part);
    }
    let State {
        generation,
        stats,
        capture,
    } = serde_json::from_slice(&state).map_err(|e| format!("a bad state: {e}"))?;
    let mut sockets: Vec<WorkerSockets> = (0..workers).map(|_| WorkerSockets::default()).collect();
    let mut received = 0;
    while received < records {
        let (message, fds) = recv(&channel)?;
        let Message::Sockets { records } = message else {
            return Err(format!("expected sockets, got {message:?}"));
        };
        if records.is_empty() || records.len() != fds.len() {
            return Err("socket records do not match their descriptors".into());
        }
        received += records.len();
        for (record, fd) in records.into_iter().zip(fds) {
            let (worker, socket) = match record {
                Record::Listener { worker, key } => (worker, Ok((key, fd))),
                Record::Flow {
                    worker,
                    client,
                    local,
                    listener,
                    endpoint,
                    idle_ms,
                    replied,
                } => {
                    let handed = HandedFlow {
                        key: FlowKey { client, local },
                        listener,
                        endpoint,
                        idle: Duration::from_millis(idle_ms),
                        replied,
                    };
                    (worker, Err((handed, fd)))
                }
            };
            let Some(to) = sockets.get_mut(worker) else {
                return Err(format!("a socket of worker {worker}, of {workers}"));
            };
            match socket {
                Ok(listener) => to.listeners.push(listener),
                Err(flow) => to.flows.push(flow),
            }
        }
    }
    info!(
        from,
        release,
        generation,
        sockets = received,
        "received the sockets of the running svcproxyd"
    );
    Ok(Some(Inheritance {
        channel,
        from,
        generation,
        stats: stats
            .into_iter()
            .filter_map(Stats::into_port_stats)
            .collect(),
        capture,
        http,
        sockets,
    }))
}

impl Inheritance {
    /// The inherited listener of the HTTP endpoint `name`, if it listens at `addr`.
    pub fn http_listener(&mut self, name: &str, addr: SocketAddr) -> Option<TcpListener> {
        let at = self
            .http
            .iter()
            .position(|(n, l)| n == name && l.local_addr().is_ok_and(|a| a == addr))?;
        Some(self.http.swap_remove(at).1)
    }

    /// Every inherited listener of the HTTP endpoints named `name`.
    pub fn http_listeners(&mut self, name: &str) -> Vec<TcpListener> {
        let (wanted, rest) = std::mem::take(&mut self.http)
            .into_iter()
            .partition(|(n, _)| n == name);
        self.http = rest;
        wanted.into_iter().map(|(_, l)| l).collect()
    }

    /// Tells the old process that this one is ready to serve; returns once it has retired
    /// (`done`). `Err` when it did not say so: it may be serving still.
    pub fn ready(self) -> Result<(), String> {
        send(&self.channel, &Message::Ready, &[])?;
        self.channel
            .set_timeout(READY_TIMEOUT)
            .map_err(|e| e.to_string())?;
        match recv(&self.channel)?.0 {
            Message::Done => Ok(()),
            other => Err(format!("unexpected {other:?}")),
        }
    }
}

/// Listens at `path` for a new svcproxyd's `hello`, replacing the socket there (a stale one
/// of a process that ended, or the one of the process that handed over to this one); anything
/// else at `path` is an error, and left alone. A missing directory is created, readable by
/// this user only.
pub fn listen(path: &Path) -> io::Result<ChannelListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "something other than a socket is there",
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    ChannelListener::bind(path)
}

/// Starts a new svcproxyd from the binary at this one's path (`argv[0]`: after an upgrade,
/// the new release), with this one's arguments, to take over.
pub fn start_successor() -> io::Result<std::process::Child> {
    let mut args = std::env::args_os();
    let program = args
        .next()
        .ok_or_else(|| io::Error::other("no program name among the arguments"))?;
    std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .spawn()
}

/// A handover the new process is ready for: retire, then [`Handing::done`].
pub struct Handing {
    channel: Channel,
    /// The new process's pid.
    pub to: u32,
}

impl Handing {
    /// Tells the new process that this one has retired.
    pub fn done(self) -> Result<(), String> {
        send(&self.channel, &Message::Done, &[])
    }
}

/// Answers a new svcproxyd on `channel`: checks its `hello`, exports `proxy`'s sockets and
/// sends them with `table`'s generation and counters, the `capture` and the `http`
/// listeners, then waits for `ready`. `Err` (with `proxy` receiving UDP again) when it was
/// refused or the new process failed.
pub fn hand_over(
    channel: Channel,
    proxy: &Proxy,
    table: &Table,
    capture: Option<CaptureState>,
    http: &[(String, TcpListener)],
) -> Result<Handing, String> {
    channel
        .set_timeout(MESSAGE_TIMEOUT)
        .map_err(|e| e.to_string())?;
    let to = channel.peer_pid().ok().flatten().unwrap_or(0);
    let (hello, _) = recv(&channel)?;
    // Says why to the new process; the error for this one's log.
    let refuse = |reason: String| {
        let _ = send(
            &channel,
            &Message::Refused {
                reason: reason.clone(),
            },
            &[],
        );
        format!("refused pid {to}: {reason}")
    };
    let Message::Hello {
        protocol, workers, ..
    } = hello
    else {
        return Err(refuse(format!("expected hello, got {hello:?}")));
    };
    if protocol != PROTOCOL {
        return Err(refuse(format!(
            "handover protocol version {protocol} asked; this svcproxyd speaks version {PROTOCOL}"
        )));
    }
    if workers != proxy.worker_count() {
        return Err(refuse(format!(
            "the new svcproxyd would run {workers} worker threads, this one runs {} (a handover needs the same number: set proxy.workers)",
            proxy.worker_count()
        )));
    }
    let exported = proxy
        .export(WORKERS_TIMEOUT)
        .map_err(|e| refuse(e.to_string()))?;
    // The counters with what socket-level load balancing counted, which ends with this
    // process.
    let state = (table.load().generation(), proxy.stats());
    let sent = offer(&channel, state, capture, http, &exported);
    drop(exported);
    let outcome = sent.and_then(|()| {
        channel
            .set_timeout(READY_TIMEOUT)
            .map_err(|e| e.to_string())?;
        match recv(&channel)?.0 {
            Message::Ready => Ok(()),
            other => Err(format!("unexpected {other:?}")),
        }
    });
    match outcome {
        Ok(()) => Ok(Handing { channel, to }),
        Err(e) => {
            proxy.resume();
            Err(format!("the handover to pid {to} failed: {e}"))
        }
    }
}

/// Sends the offer and the socket records.
fn offer(
    channel: &Channel,
    (generation, stats): (u64, Vec<PortStats>),
    capture: Option<CaptureState>,
    http: &[(String, TcpListener)],
    exported: &[WorkerSockets],
) -> Result<(), String> {
    let mut records = Vec::new();
    for (worker, sockets) in exported.iter().enumerate() {
        for (key, fd) in &sockets.listeners {
            records.push((Record::Listener { worker, key: *key }, fd.as_fd()));
        }
        for (flow, fd) in &sockets.flows {
            let record = Record::Flow {
                worker,
                client: flow.key.client,
                local: flow.key.local,
                listener: flow.listener,
                endpoint: flow.endpoint,
                idle_ms: flow.idle.as_millis() as u64,
                replied: flow.replied,
            };
            records.push((record, fd.as_fd()));
        }
    }
    let state = serde_json::to_vec(&State {
        generation,
        stats: stats.into_iter().map(Stats::from).collect(),
        capture,
    })
    .map_err(|e| e.to_string())?;
    let http_fds: Vec<BorrowedFd<'_>> = http.iter().map(|(_, l)| l.as_fd()).collect();
    send(
        channel,
        &Message::Offer {
            protocol: PROTOCOL,
            release: env!("CARGO_PKG_VERSION").into(),
            http: http.iter().map(|(name, _)| name.clone()).collect(),
            state: state.len(),
            records: records.len(),
        },
        &http_fds,
    )?;
    for part in state.chunks(STATE_PART) {
        channel
            .send(part, &[])
            .map_err(|e| format!("sending the state: {e}"))?;
    }
    let mut records = records.into_iter().peekable();
    while records.peek().is_some() {
        let (batch, fds): (Vec<Record>, Vec<BorrowedFd<'_>>) =
            records.by_ref().take(MAX_FDS).unzip();
        send(channel, &Message::Sockets { records: batch }, &fds)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use svcproxy::{BackendKind, Options, ProxyConfig, TableConfig};

    use super::*;

    #[test]
    fn another_protocol_version_is_refused_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("svcproxyd-upgrade-{}", std::process::id()));
        let path = dir.join("upgrade.sock");
        let listener = listen(&path).unwrap();
        let table = Arc::new(Table::new(TableConfig::default()));
        let options = Options {
            backend: BackendKind::Epoll,
            config: ProxyConfig {
                workers: 1,
                ..ProxyConfig::default()
            },
        };
        let proxy = Proxy::start(table.clone(), options).unwrap();

        let new = Channel::connect(&path).unwrap();
        new.set_timeout(MESSAGE_TIMEOUT).unwrap();
        let hello = Message::Hello {
            protocol: PROTOCOL + 1,
            release: "9.9.9".into(),
            workers: 1,
        };
        send(&new, &hello, &[]).unwrap();
        let old = listener.accept().unwrap().expect("the new process");
        let refused = hand_over(old, &proxy, &table, None, &[]).err().unwrap();
        assert!(
            refused.contains(&format!("version {}", PROTOCOL + 1)),
            "{refused}"
        );
        match recv(&new).unwrap().0 {
            Message::Refused { reason } => assert!(reason.contains("this svcproxyd speaks")),
            other => panic!("{other:?}"),
        }
        proxy.shutdown(Duration::ZERO).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_a_socket_is_replaced_at_the_upgrade_path() {
        let dir =
            std::env::temp_dir().join(format!("svcproxyd-upgrade-path-{}", std::process::id()));
        let path = dir.join("private/upgrade.sock");
        let first = listen(&path).unwrap();
        drop(first);
        let mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700
        );
        // A socket left there is replaced.
        drop(listen(&path).unwrap());
        // A file is not.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "keep me").unwrap();
        let e = listen(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
