//! HTTP workloads with widely used programs on both ends: nginx serves a small page on every
//! backend address (port [`HTTP_PORT`], one worker, in the backend namespace) and wrk is the
//! client (in the client namespace), against each candidate's HTTP service.
//!
//! - `wrk-rr`: 50 keep-alive connections, one request in flight on each.
//! - `wrk-cps`: 16 connections, each request on a new connection (`Connection: close`).
//!
//! Both are skipped (n/a) where nginx or wrk is not installed.

use std::io::{self, BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::backends::HTTP_PORT;
use crate::topo::Topology;

/// The nginx web server behind every backend address; stopped when dropped.
pub struct WebServer {
    child: Child,
}

impl WebServer {
    /// Starts nginx in the backend namespace with its files in `dir`, and waits until it
    /// answers on every backend address. `None` when nginx is not installed.
    pub fn start(topo: &Topology, dir: &Path) -> io::Result<Option<Self>> {
        if !crate::which("nginx") {
            return Ok(None);
        }
        let listens: String = topo
            .backend_ips
            .iter()
            .map(|ip| format!("    listen {ip}:{HTTP_PORT} reuseport;\n"))
            .collect();
        let dir = dir.join("web");
        std::fs::create_dir_all(&dir)?;
        let cfg = format!(
            "worker_processes 1;\nworker_rlimit_nofile 65536;\ndaemon off;\n\
             pid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
             events {{ worker_connections 16384; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 300s;\n\
             \x20 client_body_temp_path {dir};\n  proxy_temp_path {dir};\n  fastcgi_temp_path {dir};\n\
             \x20 uwsgi_temp_path {dir};\n  scgi_temp_path {dir};\n\
             \x20 server {{\n{listens}    location / {{ return 200 \"svcbench\\n\"; }}\n  }}\n}}\n",
            dir = dir.display(),
        );
        let file = dir.join("nginx.conf");
        std::fs::write(&file, cfg)?;
        let mut cmd = match topo.backend_ns() {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}")).arg("nginx");
                c
            }
            None => Command::new("nginx"),
        };
        cmd.args(["-c", &file.to_string_lossy(), "-p", &dir.to_string_lossy()]);
        let server = Self {
            child: cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        };
        let addrs: Vec<SocketAddr> = topo
            .backend_ips
            .iter()
            .map(|ip| SocketAddr::new(*ip, HTTP_PORT))
            .collect();
        crate::candidates::wait_listening(topo.backend_ns(), addrs)?;
        Ok(Some(server))
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Ends the web server's TIME_WAIT sockets. In `wrk-cps` the server closes first, so it keeps
/// one per connection, and a later candidate's connection on the same 4-tuple (every candidate
/// connects from the client address; kernel DNAT keeps the client's port) carries another
/// timestamp offset: PAWS drops its SYN, retransmitted a second later.
fn forget_closed(topo: &Topology) -> io::Result<()> {
    let filter = format!("( sport = :{HTTP_PORT} )");
    let args = ["-K", "-tn", "state", "time-wait", filter.as_str()];
    let status = match topo.backend_ns() {
        Some(ns) => Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{ns}"))
            .arg("ss")
            .args(args)
            .stdout(Stdio::null())
            .status()?,
        None => Command::new("ss")
            .args(args)
            .stdout(Stdio::null())
            .status()?,
    };
    match status.success() {
        true => Ok(()),
        false => Err(io::Error::other(format!("ss -K failed: {status}"))),
    }
}

/// What one wrk run measured.
pub struct Run {
    pub rps: f64,
    pub p50: Duration,
    pub p99: Duration,
    /// Socket errors and non-2xx answers.
    pub errors: u64,
}

/// Runs wrk from the client namespace against `target` for `duration` (whole seconds, at least
/// one) with `connections` connections; `close` makes each request a new connection. `None`
/// when wrk is not installed.
pub fn wrk(
    topo: &Topology,
    target: SocketAddr,
    connections: usize,
    close: bool,
    duration: Duration,
) -> io::Result<Option<Run>> {
    if !crate::which("wrk") {
        return Ok(None);
    }
    if close {
        forget_closed(topo)?;
    }
    let secs = duration.as_secs_f64().ceil().max(1.0) as u64;
    let mut cmd = topo.command_in_client("wrk");
    cmd.args(["-t1", "--latency", "--timeout", "5s"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{secs}s"));
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{target}/"));
    let started = Instant::now();
    let out = cmd.stdin(Stdio::null()).stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "wrk failed after {:.1} s: {}",
            started.elapsed().as_secs_f64(),
            out.status
        )));
    }
    parse(&out.stdout).map(Some)
}

/// Reads wrk's report: `Requests/sec:`, the `--latency` distribution, errors.
fn parse(report: &[u8]) -> io::Result<Run> {
    let mut rps = None;
    let (mut p50, mut p99) = (None, None);
    let mut errors = 0;
    for line in BufReader::new(report).lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", n] => rps = n.parse().ok(),
            ["50%", t] => p50 = latency(t),
            ["99%", t] => p99 = latency(t),
            ["Non-2xx", "or", "3xx", "responses:", n] => errors += n.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            _ => {}
        }
    }
    match (rps, p50, p99) {
        (Some(rps), Some(p50), Some(p99)) => Ok(Run {
            rps,
            p50,
            p99,
            errors,
        }),
        _ => Err(io::Error::other(format!(
            "unexpected wrk report: {}",
            String::from_utf8_lossy(report)
        ))),
    }
}

/// A wrk latency: a number and a unit (`us`, `ms`, `s`).
fn latency(text: &str) -> Option<Duration> {
    let digits = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(digits);
    let number: f64 = number.parse().ok()?;
    let scale = match unit {
        "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(number * scale))
}
