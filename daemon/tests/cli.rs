//! svcproxyd as a user runs it, on loopback: `check`, `run` with a TOML config, the admin API,
//! reload on file change, rejected edits, and a clean exit on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::http;

const BIN: &str = env!("CARGO_BIN_EXE_svcproxyd");

/// The floods take every core for a while: they run alone, the other tests together.
static EXCLUSIVE: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    EXCLUSIVE
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    EXCLUSIVE
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
const TIMEOUT: Duration = Duration::from_secs(10);

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("svcproxyd-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A port free for TCP and UDP on 127.0.0.1, for a daemon to listen on later. Taken below the
/// ephemeral range (32768 up), so that no socket binding port 0 or connecting can take it
/// meanwhile (after a flood, few ephemeral ports are free and one just released comes back
/// soon), and never the same twice in this process.
fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let start = std::process::id() % SPAN;
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(n < SPAN, "no free port left below the ephemeral range");
        let port = (FIRST + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
}

/// A backend answering its name on each connection.
fn backend(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = writeln!(s, "{name}");
        }
    });
    addr
}

fn ask(addr: SocketAddr) -> std::io::Result<String> {
    let s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

/// Sends a raw request head and reads the response status.
fn http_head(admin: SocketAddr, head: &str) -> u16 {
    let mut s = TcpStream::connect_timeout(&admin, TIMEOUT).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    reply.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Waits for `condition` (polling the daemon's own interfaces), failing after TIMEOUT.
fn eventually(what: &str, condition: impl FnMut() -> bool) {
    eventually_within(TIMEOUT, what, condition);
}

/// Waits up to `limit` for `condition`, polling.
fn eventually_within(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where a daemon serves its HTTP endpoints.
#[derive(Debug, Clone, Copy)]
struct Endpoints {
    admin: SocketAddr,
    health: SocketAddr,
    metrics: SocketAddr,
}

struct Daemon {
    child: Child,
    /// The admin API's address (`/services`).
    admin: SocketAddr,
    /// The health endpoint's (`/healthz`, `/livez`).
    health: SocketAddr,
    /// The metrics endpoint's (`/metrics`).
    metrics: SocketAddr,
    /// What it has logged so far.
    log: Arc<Mutex<String>>,
}

impl Daemon {
    fn start(config: &Path, admin: SocketAddr, extra: &[&str]) -> Self {
        Self::start_with(Command::new(BIN), config, admin, extra)
    }

    /// `svcproxyd run` through `command` (`BIN` itself, or a wrapper given `BIN`).
    /// Besides the admin API on `admin`, the health and metrics endpoints get free ports of
    /// their own. Returns once the admin endpoint answers.
    fn start_with(command: Command, config: &Path, admin: SocketAddr, extra: &[&str]) -> Self {
        let endpoints = Endpoints {
            admin,
            health: SocketAddr::from(([127, 0, 0, 1], free_port())),
            metrics: SocketAddr::from(([127, 0, 0, 1], free_port())),
        };
        let mut d = Self::spawn(command, config, endpoints, extra);
        eventually("the admin endpoint", || {
            assert!(
                d.child.try_wait().unwrap().is_none(),
                "svcproxyd exited early"
            );
            TcpStream::connect(admin).is_ok()
        });
        d
    }

    /// `svcproxyd run` through `command`, its endpoints at `endpoints`, without waiting.
    fn spawn(mut command: Command, config: &Path, endpoints: Endpoints, extra: &[&str]) -> Self {
        let Endpoints {
            admin,
            health,
            metrics,
        } = endpoints;
        let child = command
            .args(["run", "--config"])
            .arg(config)
            .args(["--no-capture", "--admin", &admin.to_string()])
            .args(["--health", &health.to_string()])
            .args(["--metrics", &metrics.to_string()])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let mut child = child;
        let stderr = child.stderr.take().unwrap();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        Self {
            child,
            admin,
            health,
            metrics,
            log,
        }
    }

    fn endpoints(&self) -> Endpoints {
        Endpoints {
            admin: self.admin,
            health: self.health,
            metrics: self.metrics,
        }
    }

    /// Waits until the daemon has logged `text`.
    fn logged(&self, text: &str) {
        eventually(&format!("the log to say {text:?}"), || {
            self.log.lock().unwrap().contains(text)
        });
    }

    fn health(&self) -> serde_json::Value {
        let (_, body) = http(self.health, "GET", "/healthz", "", "");
        serde_json::from_str(&body).unwrap()
    }

    /// The health report once `/healthz` answers 503.
    fn unhealthy(&self) -> serde_json::Value {
        let mut health = String::new();
        eventually("/healthz to say 503", || {
            let (status, body) = http(self.health, "GET", "/healthz", "", "");
            health = body;
            status == 503
        });
        serde_json::from_str(&health).unwrap()
    }

    fn generation(&self) -> u64 {
        self.health()["generation"].as_u64().unwrap()
    }

    /// How many times the config was reloaded (applied or not).
    fn reloads(&self) -> u64 {
        self.health()["reloads"].as_u64().unwrap()
    }

    fn stop(mut self) -> i32 {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        self.exit_code("SIGTERM")
    }

    /// Waits for the process to exit (after `after`), returning its exit code.
    fn exit_code(&mut self, after: &str) -> i32 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "svcproxyd did not exit after {after}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self
                .log
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "svcproxyd's last log lines, newest first:\n{}",
                tail.join("\n")
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(port: u16, endpoints: &[SocketAddr]) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|e| format!("{{ address = \"{e}\" }}"))
        .collect();
    format!(
        "[proxy]\nworkers = 1\n\n[[services]]\nname = \"default/web\"\naddresses = [\"127.0.0.1\"]\nports = [{{ port = {port} }}]\nendpoints = [{}]\n",
        eps.join(", ")
    )
}

#[test]
fn check_accepts_good_configs_and_names_what_is_wrong_in_bad_ones() {
    let _g = shared();
    let dir = temp("check");
    let good = dir.join("good.toml");
    std::fs::write(&good, config(8080, &["127.0.0.1:9001".parse().unwrap()])).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "default/web: 1 endpoints, 127.0.0.1:8080/TCP"
    );

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, config(0, &[])).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!(
            "{}: services[0] \"default/web\": ports[0].port: must not be 0",
            bad.display()
        )
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(dir.join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}

#[test]
fn run_serves_reloads_rejects_bad_edits_and_exits_cleanly() {
    let _g = shared();
    let dir = temp("run");
    let (alpha, bravo) = (backend("alpha"), backend("bravo"));
    let port = free_port();
    let vip: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port));
    let path = dir.join("svcproxyd.toml");
    std::fs::write(&path, config(port, &[alpha])).unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let d = Daemon::start(&path, admin, &[]);
    eventually("the service", || ask(vip).is_ok_and(|a| a == "alpha"));

    // Health, metrics, the table.
    let (status, body) = http(d.health, "GET", "/healthz", "", "");
    assert_eq!(status, 200);
    assert!(body.contains("lastUpdated"), "{body}");
    let (status, metrics) = http(d.metrics, "GET", "/metrics", "", "");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("svcproxy_connections_total{service=\"default/web\",port=\"")
            && metrics.contains("svcproxy_table_generation"),
        "{metrics}"
    );
    let (_, table) = http(admin, "GET", "/services", "", "");
    let table: serde_json::Value = serde_json::from_str(&table).unwrap();
    assert_eq!(table["services"][0]["name"], "default/web");

    // Reload: the file changes, new connections follow.
    let before = d.generation();
    std::fs::write(&path, config(port, &[bravo])).unwrap();
    eventually("the reload", || d.generation() > before);
    eventually("the new endpoint", || ask(vip).is_ok_and(|a| a == "bravo"));

    // A bad edit is rejected (the health report says so); the running table stays.
    let (before, reloads) = (d.generation(), d.reloads());
    std::fs::write(
        &path,
        "[[services]]\nname = \"default/web\"\nports = [{ port = 0 }]\n",
    )
    .unwrap();
    eventually("the rejected reload", || d.reloads() > reloads);
    assert_eq!(
        d.health()["lastReloadError"],
        format!(
            "{}: services[0] \"default/web\": ports[0].port: must not be 0",
            path.display()
        )
    );
    assert_eq!(d.generation(), before);
    assert_eq!(ask(vip).unwrap(), "bravo");

    // The admin API changes the table too, with the file's schema.
    let other_port = free_port();
    let svc = format!(
        "{{\"name\": \"api/extra\", \"addresses\": [\"127.0.0.1\"], \"ports\": [{{\"port\": {other_port}}}], \"endpoints\": [{{\"address\": \"{alpha}\"}}]}}"
    );
    let (status, body) = http(admin, "PUT", "/services/api/extra", "", &svc);
    assert_eq!(status, 200, "{body}");
    eventually("the API service", || {
        ask(SocketAddr::from(([127, 0, 0, 1], other_port))).is_ok_and(|a| a == "alpha")
    });
    let (status, body) = http(
        admin,
        "PUT",
        "/services/api/extra",
        "",
        "{\"name\": \"api/extra\", \"ports\": []}",
    );
    assert_eq!(status, 400);
    assert!(body.contains("ports: must not be empty"), "{body}");
    let (status, _) = http(admin, "PUT", "/services/api/other", "", &svc);
    assert_eq!(status, 400, "the path and body must name the same service");
    let (status, _) = http(admin, "PUT", "/services/api/extra", "", "{not json");
    assert_eq!(status, 400);
    // A body over the limit is refused from its header, before it is sent.
    let head = "PUT /services/api/extra HTTP/1.1\r\nContent-Length: 2097152\r\n\r\n";
    assert_eq!(http_head(admin, head), 413);
    let (status, _) = http(admin, "DELETE", "/services/api/extra", "", "");
    assert_eq!(status, 200);
    let (status, _) = http(admin, "DELETE", "/services/api/extra", "", "");
    assert_eq!(status, 404);
    let (status, _) = http(admin, "GET", "/nowhere", "", "");
    assert_eq!(status, 404);

    assert_eq!(d.stop(), 0, "SIGTERM drains and exits 0");
    assert!(
        TcpStream::connect(vip).is_err(),
        "nothing listens after exit"
    );
}

#[test]
fn the_admin_endpoint_requires_a_token_when_one_is_set_and_off_loopback() {
    let _g = shared();
    let dir = temp("token");
    let path = dir.join("svcproxyd.toml");
    std::fs::write(&path, config(free_port(), &[])).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let d = Daemon::start(
        &path,
        admin,
        &["--admin-token-file", token.to_str().unwrap()],
    );
    assert_eq!(
        http(d.health, "GET", "/healthz", "", "").0,
        200,
        "health stays open"
    );
    assert_eq!(http(admin, "GET", "/services", "", "").0, 401);
    assert_eq!(
        http(
            admin,
            "GET",
            "/services",
            "Authorization: Bearer nope\r\n",
            ""
        )
        .0,
        401
    );
    assert_eq!(
        http(
            admin,
            "GET",
            "/services",
            "Authorization: Bearer s3cret\r\n",
            ""
        )
        .0,
        200
    );
    assert_eq!(d.stop(), 0);

    // A non-loopback admin address without a token is refused at start.
    let out = Command::new(BIN)
        .args(["run", "--no-capture", "--admin", "0.0.0.0:0", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not loopback: set a bearer token"));
}

/// A backend that echoes each connection until the client closes it.
fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut &s, &mut &s);
            });
        }
    });
    addr
}

/// A daemon with `workers` workers and a minute of shutdown grace, serving one service in
/// front of an echo backend: the daemon, the service's address and the config file's path
/// and text.
fn echo_daemon(name: &str, workers: usize) -> (Daemon, SocketAddr, PathBuf, String) {
    let port = free_port();
    let path = temp(name).join("svcproxyd.toml");
    let text = config(port, &[echo_backend()]).replace(
        "workers = 1",
        &format!("workers = {workers}\nshutdown_grace_s = 60"),
    );
    std::fs::write(&path, &text).unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let d = Daemon::start(&path, admin, &[]);
    (d, SocketAddr::from(([127, 0, 0, 1], port)), path, text)
}

/// Publishes the fault-injection service `name` (svcproxy-core's `fault` module: a worker
/// applying it panics) through the admin API.
fn inject(admin: SocketAddr, name: &str) {
    let body = format!(
        r#"{{"name": "{name}", "addresses": ["127.0.0.1"], "ports": [{{"port": {}}}]}}"#,
        free_port()
    );
    let (status, reply) = http(admin, "PUT", &format!("/services/{name}"), "", &body);
    assert_eq!(status, 200, "{reply}");
}

/// The daemon's whole `/metrics` page, parsed as OpenMetrics: its families by name.
fn metric_families(
    d: &Daemon,
) -> std::collections::HashMap<
    String,
    openmetrics_parser::MetricFamily<
        openmetrics_parser::OpenMetricsType,
        openmetrics_parser::OpenMetricsValue,
    >,
> {
    let (status, text) = http(d.metrics, "GET", "/metrics", "", "");
    assert_eq!(status, 200);
    openmetrics_parser::openmetrics::parse_openmetrics(&text)
        .unwrap_or_else(|e| panic!("/metrics is not OpenMetrics: {e:?}\n{text}"))
        .families
}

#[test]
fn health_metrics_and_admin_answer_each_on_its_own_address() {
    let _g = shared();
    let path = temp("endpoints").join("svcproxyd.toml");
    // A second service keeps its traffic on this node and has no endpoint here.
    let text = config(free_port(), &[echo_backend()])
        + &format!(
            "\n[[services]]\nname = \"default/local\"\naddresses = [\"127.0.0.1\"]\nports = [{{ port = {} }}]\n\
             internal_traffic_policy = \"Local\"\nendpoints = [{{ address = \"127.0.0.1:9\", node = \"elsewhere\" }}]\n",
            free_port()
        )
        + "\n[node]\nname = \"here\"\n\n[health]\npending_timeout_s = 1\n";
    std::fs::write(&path, text).unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let d = Daemon::start(&path, admin, &[]);
    // /healthz as kube-proxy's: RFC 3339 times, node eligibility.
    let (status, body) = http(d.health, "GET", "/healthz", "", "");
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    for field in ["lastUpdated", "currentTime"] {
        let time = health[field].as_str().unwrap_or_default();
        assert!(humantime::parse_rfc3339(time).is_ok(), "{field}: {body}");
    }
    assert_eq!(health["nodeEligible"], true);
    assert_eq!(health["appliedGeneration"], health["generation"]);
    assert_eq!(http(d.health, "GET", "/livez", "", "").0, 200);
    assert_eq!(http(d.health, "POST", "/healthz", "", "").0, 405);
    // Each endpoint serves its own paths only.
    for (address, path) in [
        (d.health, "/metrics"),
        (d.health, "/services"),
        (d.metrics, "/healthz"),
        (d.metrics, "/services"),
        (admin, "/healthz"),
        (admin, "/metrics"),
    ] {
        assert_eq!(http(address, "GET", path, "", "").0, 404, "{address}{path}");
    }
    assert_eq!(http(admin, "GET", "/services", "", "").0, 200);
    // The whole exposition parses as OpenMetrics, with kube-proxy's series and svcproxy's.
    let families = metric_families(&d);
    for family in [
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_network_programming_duration_seconds",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_service_changes",
        "kubeproxy_sync_proxy_rules_endpoint_changes",
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "svcproxy_connections",
        "svcproxy_endpoint_bytes_in",
        "svcproxy_table_generation",
        "svcproxy_worker_up",
    ] {
        assert!(families.contains_key(family), "no {family}");
    }
    let no_local = format!(
        "{}",
        families["kubeproxy_sync_proxy_rules_no_local_endpoints_total"]
    );
    assert!(
        no_local.contains(r#"{traffic_policy="internal"} 1"#)
            && no_local.contains(r#"{traffic_policy="external"} 0"#),
        "{no_local}"
    );

    // A change that waits for the data path longer than the pending timeout (1 s): the only
    // worker fails 4 times applying it (fault injection; 1.5 s of restart backoff), and
    // /healthz says 503 naming it while /livez stays 200; once applied, 200 again.
    inject(admin, "fault-injection/panic-0-4");
    let health = d.unhealthy();
    let reason = health["unhealthy"].as_str().unwrap();
    assert!(
        reason.contains("is not applied by every worker yet"),
        "{reason}"
    );
    assert!(health["pendingSince"].is_string(), "{health}");
    assert_eq!(http(d.health, "GET", "/livez", "", "").0, 200);
    let pending = &metric_families(&d)["kubeproxy_sync_proxy_rules_service_changes_pending"];
    assert!(format!("{pending}").contains("_pending 1"), "{pending}");
    eventually("the change to reach the data path", || {
        http(d.health, "GET", "/healthz", "", "").0 == 200
    });
    assert_eq!(d.stop(), 0);
}

#[test]
fn a_worker_that_keeps_failing_is_reported_everywhere_and_the_daemon_exits_non_zero() {
    let _g = shared();
    let (mut d, vip, _, _) = echo_daemon("supervision", 2);
    let admin = d.admin;
    // Connections through both workers (the kernel spreads them; 16 all on worker 0 is a
    // chance of 1 in 65536): those on worker 1 keep the drain, and so the daemon, going.
    let held: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut s = TcpStream::connect_timeout(&vip, TIMEOUT).unwrap();
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            s.write_all(b"x").unwrap();
            s.read_exact(&mut [0]).unwrap();
            s
        })
        .collect();
    assert_eq!(http(d.health, "GET", "/healthz", "", "").0, 200);

    // Worker 0 panics whenever it applies a table holding this service (a test build's
    // fault injection), so its restarts fail until it is given up on.
    inject(admin, "fault-injection/panic-0");
    let health = d.unhealthy();
    let reason = health["unhealthy"].as_str().unwrap();
    assert!(
        reason.contains("worker 0 failed") && reason.contains("fault injected"),
        "{reason}"
    );
    assert_eq!(health["workers"][0]["down"], true);
    assert_eq!(health["workers"][1]["down"], false);
    let (_, metrics) = http(d.metrics, "GET", "/metrics", "", "");
    assert!(
        metrics.contains("svcproxy_worker_up{worker=\"0\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("svcproxy_worker_up{worker=\"1\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("svcproxy_worker_restarts_total{worker=\"0\"} 5"),
        "{metrics}"
    );
    drop(held);
    assert_eq!(d.exit_code("a worker went down"), 1);
    let log = d.log.lock().unwrap().clone();
    assert!(log.contains("worker failed; restarting it"), "{log}");
    assert!(
        log.contains("worker 0 failed: panicked: fault injected"),
        "{log}"
    );
}

#[test]
fn reloads_are_safe_and_shutdown_drains_with_healthz_503() {
    let _g = shared();
    let (mut d, vip, path, text) = echo_daemon("drain", 1);
    let (admin, port) = (d.admin, vip.port());
    let echo = |s: &mut TcpStream| -> std::io::Result<()> {
        s.write_all(b"x")?;
        s.read_exact(&mut [0])
    };
    let open = || {
        let mut s = TcpStream::connect_timeout(&vip, TIMEOUT).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        echo(&mut s).map(|()| s)
    };
    let mut held = open().unwrap();

    // The file owns its services: the admin API may not change them behind its back.
    let body = format!(
        r#"{{"name": "default/web", "addresses": ["127.0.0.1"], "ports": [{{"port": {port}}}]}}"#
    );
    let (status, reply) = http(admin, "PUT", "/services/default/web", "", &body);
    assert_eq!(status, 409, "{reply}");
    assert!(reply.contains("svcproxyd.toml: services[0]"), "{reply}");
    assert_eq!(
        http(admin, "DELETE", "/services/default/web", "", "").0,
        409
    );

    // An editor saving in place empties the file first: that is not applied.
    let reloads = d.reloads();
    std::fs::write(&path, "").unwrap();
    eventually("the rejected reload", || d.reloads() > reloads);
    let error = d.health()["lastReloadError"].as_str().unwrap().to_string();
    assert!(
        error.ends_with("the file is empty (write a comment to mean that it defines nothing)"),
        "{error}"
    );
    open().expect("the service still runs");
    std::fs::write(&path, &text).unwrap();

    // SIGTERM: /healthz says 503 for as long as connections drain, and they keep working.
    let pid = rustix::process::Pid::from_raw(d.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let health = d.unhealthy();
    assert_eq!(health["unhealthy"], "shutting down");
    echo(&mut held).expect("a connection open at SIGTERM keeps working while it drains");
    assert!(
        TcpStream::connect_timeout(&vip, TIMEOUT).is_err(),
        "no new connections"
    );
    drop(held);
    assert_eq!(d.exit_code("the drain"), 0);
}

#[test]
fn sigterm_stops_the_daemon_even_out_of_descriptors() {
    let _g = shared();
    let path = temp("exhausted").join("svcproxyd.toml");
    let backend = echo_backend();
    std::fs::write(&path, config(free_port(), &[backend])).unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut limited = Command::new("prlimit");
    limited.arg("--nofile=48:48").arg(BIN);
    let mut d = Daemon::start_with(limited, &path, admin, &[]);
    // Listeners are not in the descriptor budget (one per service port and worker): 60
    // services take every descriptor left, and the admin endpoint waits in accept().
    let port = free_port();
    let many: String = (1..=60)
        .map(|i| {
            format!(
                "[[services]]\nname = \"default/s{i}\"\naddresses = [\"127.0.9.{i}\"]\nports = [{{ port = {port} }}]\nendpoints = [{{ address = \"{backend}\" }}]\n"
            )
        })
        .collect();
    std::fs::write(&path, format!("[proxy]\nworkers = 1\n\n{many}")).unwrap();
    eventually("descriptors to run out", || {
        d.log.lock().unwrap().contains("Too many open files")
    });
    let pid = rustix::process::Pid::from_raw(d.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert_eq!(d.exit_code("SIGTERM with no descriptor left"), 0);
}

/// A UDP backend echoing the datagrams `answers` accepts.
fn udp_backend(answers: impl Fn(&[u8]) -> bool + Send + 'static) -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            if answers(&buf[..n]) {
                let _ = s.send_to(&buf[..n], from);
            }
        }
    });
    addr
}

#[test]
fn a_udp_flood_from_many_ports_leaves_tcp_and_the_admin_endpoint_their_descriptors() {
    let _g = shared();
    let (tcp_port, udp_port) = (free_port(), free_port());
    let path = temp("flood").join("svcproxyd.toml");
    let text = format!(
        "[proxy]\nworkers = 1\n\n\
         [[services]]\nname = \"default/web\"\naddresses = [\"127.0.0.1\"]\nports = [{{ port = {tcp_port} }}]\nendpoints = [{{ address = \"{}\" }}]\n\n\
         [[services]]\nname = \"default/dns\"\naddresses = [\"127.0.0.1\"]\nports = [{{ port = {udp_port}, protocol = \"UDP\" }}]\nendpoints = [{{ address = \"{}\" }}]\n",
        echo_backend(),
        udp_backend(|_| true)
    );
    std::fs::write(&path, text).unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // 256 descriptors: without a budget, 300 UDP flows (a socket each) take them all.
    let mut limited = Command::new("prlimit");
    limited.arg("--nofile=256:256").arg(BIN);
    let d = Daemon::start_with(limited, &path, admin, &[]);
    let (_, metrics) = http(d.metrics, "GET", "/metrics", "", "");
    assert!(
        metrics.contains("svcproxy_descriptor_limit 256"),
        "{metrics}"
    );
    let udp_vip = SocketAddr::from(([127, 0, 0, 1], udp_port));
    let flood: Vec<std::net::UdpSocket> = (0..300)
        .map(|_| {
            let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            c.send_to(b"flood", udp_vip).unwrap();
            c
        })
        .collect();
    // Every datagram of the flood was forwarded on a flow or refused by a limit.
    let dns = |metrics: &str, name: &str| service_metric(metrics, name, "default/dns");
    eventually("the flood to be handled", || {
        let (_, m) = http(d.metrics, "GET", "/metrics", "", "");
        dns(&m, "datagrams_in_total") + dns(&m, "limited_total") >= 300
    });
    let tcp_vip = SocketAddr::from(([127, 0, 0, 1], tcp_port));
    for _ in 0..20 {
        let mut s = TcpStream::connect_timeout(&tcp_vip, TIMEOUT).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.write_all(b"x").unwrap();
        s.read_exact(&mut [0])
            .expect("TCP through the proxy still works");
    }
    assert_eq!(
        http(d.health, "GET", "/healthz", "", "").0,
        200,
        "so does the admin endpoint"
    );
    // One source took its share of the flows; a client from another address still gets one.
    let client = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    for i in 0..10u8 {
        client.send_to(&[i], udp_vip).unwrap();
        let mut reply = [0u8; 4];
        let (n, from) = client
            .recv_from(&mut reply)
            .expect("a reply through the proxy");
        assert_eq!((&reply[..n], from), (&[i][..], udp_vip));
    }
    let (_, metrics) = http(d.metrics, "GET", "/metrics", "", "");
    let max = gauge(&metrics, "max_udp_flows");
    let flows = dns(&metrics, "connections_active");
    assert!(
        flows <= max / 4 + 1,
        "{flows} flows, the flood's share is {}",
        max / 4
    );
    assert!(dns(&metrics, "limited_total") >= 300 - max / 4, "{metrics}");
    drop(flood);
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The value of `svcproxy_<name>{service="<service>",...}` in a metrics page (0 if absent).
fn service_metric(metrics: &str, name: &str, service: &str) -> u64 {
    let prefix = format!("svcproxy_{name}{{service=\"{service}\"");
    metrics
        .lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// The value of the unlabelled `svcproxy_<name>` in a metrics page.
fn gauge(metrics: &str, name: &str) -> u64 {
    let prefix = format!("svcproxy_{name} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix}in {metrics}"))
}

/// A client beside a flood, until `flooding` ends (at most 2,000 rounds): each
/// round opens a TCP connection to `tcp_vip` (an echo service) and exchanges a byte, then asks
/// `udp_vip` (a service answering datagrams starting with "probe") a question. Any failure
/// fails the test; it returns the number of rounds.
fn probing_client(
    tcp_vip: SocketAddr,
    udp_vip: SocketAddr,
    flooding: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        let udp = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut rounds = 0u32;
        while flooding.load(std::sync::atomic::Ordering::SeqCst) && rounds < 2000 {
            let mut s = TcpStream::connect_timeout(&tcp_vip, TIMEOUT)
                .unwrap_or_else(|e| panic!("round {rounds}: TCP connect: {e}"));
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            s.write_all(b"x").unwrap();
            s.read_exact(&mut [0])
                .unwrap_or_else(|e| panic!("round {rounds}: TCP exchange: {e}"));
            // A datagram can be lost in a full socket buffer: ask up to 5 times, as any
            // resolver would.
            let question = format!("probe {rounds}");
            let answered = (0..5).any(|_| {
                udp.send_to(question.as_bytes(), udp_vip).unwrap();
                // Skip late answers to earlier questions.
                let mut reply = [0u8; 64];
                while let Ok((n, from)) = udp.recv_from(&mut reply) {
                    if &reply[..n] == question.as_bytes() && from == udp_vip {
                        return true;
                    }
                }
                false
            });
            assert!(answered, "round {rounds}: no answer over UDP");
            rounds += 1;
        }
        rounds
    })
}

/// One datagram from each of 100,000 source ports on 400 loopback addresses, against each
/// backend, while another client opens TCP connections and asks over UDP through the proxy.
#[test]
fn a_flood_of_100k_udp_sources_fails_no_other_client_and_leaves_nothing_behind() {
    let _alone = alone();
    for backend in ["epoll", "io_uring"] {
        let (tcp_port, udp_port) = (free_port(), free_port());
        let path = temp(&format!("flood100k-{backend}")).join("svcproxyd.toml");
        let text = format!(
            "[proxy]\nworkers = 2\n\n\
             [[services]]\nname = \"default/web\"\naddresses = [\"127.0.0.1\"]\nports = [{{ port = {tcp_port} }}]\nendpoints = [{{ address = \"{}\" }}]\n\n\
             [[services]]\nname = \"default/dns\"\naddresses = [\"127.0.0.1\"]\nports = [{{ port = {udp_port}, protocol = \"UDP\" }}]\nendpoints = [{{ address = \"{}\" }}]\n",
            echo_backend(),
            // A flood gets no reply; the other client's questions do.
            udp_backend(|d| d.starts_with(b"probe"))
        );
        std::fs::write(&path, text).unwrap();
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let d = Daemon::start(&path, admin, &["--backend", backend]);
        let (tcp_vip, udp_vip) = (
            SocketAddr::from(([127, 0, 0, 1], tcp_port)),
            SocketAddr::from(([127, 0, 0, 1], udp_port)),
        );
        let metric = |name: &str| {
            service_metric(
                &http(d.metrics, "GET", "/metrics", "", "").1,
                name,
                "default/dns",
            )
        };
        let baseline = open_descriptors(d.child.id());
        let flooding = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let client = probing_client(tcp_vip, udp_vip, flooding.clone());
        for i in 0..100_000u32 {
            let source =
                std::net::Ipv4Addr::new(127, 0, 10 + (i % 400 / 200) as u8, (i % 200) as u8 + 1);
            let s = std::net::UdpSocket::bind((source, 0)).unwrap();
            let _ = s.send_to(b"flood", udp_vip);
        }
        flooding.store(false, std::sync::atomic::Ordering::SeqCst);
        let rounds = client.join().unwrap();
        assert!(rounds > 0, "{backend}: the client ran");
        // More flows than fit: the counters show those evicted to make room (some of the
        // flood is lost in socket buffers, as UDP is under any flood).
        eventually("the evicted flows to be counted", || {
            metric("evicted_total") > 0
        });
        eprintln!(
            "{backend}: {} flood datagrams in, {} flows evicted, {} limited, {rounds} client rounds",
            metric("datagrams_in_total"),
            metric("evicted_total"),
            metric("limited_total")
        );
        let max = gauge(
            &http(d.metrics, "GET", "/metrics", "", "").1,
            "max_udp_flows",
        );
        assert!(
            metric("connections_active") <= 2 * max,
            "{backend}: flows within the budget"
        );
        // Unanswered flows expire after 5 s: back to the idle baseline (the client's own
        // flow may still be there).
        eventually_within(
            Duration::from_secs(30),
            "the flood's flows to expire",
            || metric("connections_active") <= 1,
        );
        eventually_within(
            Duration::from_secs(30),
            "the descriptors to come back",
            || open_descriptors(d.child.id()) <= baseline + 1,
        );
        assert_eq!(d.stop(), 0, "{backend}");
    }
}

/// Drops the connections of `held` the other side has closed (they read EOF).
fn drop_closed(held: &mut Vec<TcpStream>) {
    held.retain(|s| !matches!(s.peek(&mut [0]), Ok(0)));
}

/// Connections a [`holding_backend`] holds; `None` once it holds none and closes each it
/// accepts.
type Held = Arc<Mutex<Option<Vec<TcpStream>>>>;

/// A backend that accepts connections and holds them, idle, letting go of those the proxy
/// has closed.
fn holding_backend(held: &Held) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let held = held.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            s.set_nonblocking(true).unwrap();
            if let Some(held) = held.lock().unwrap().as_mut() {
                held.push(s);
                if held.len() % 256 == 0 {
                    drop_closed(held);
                }
            }
        }
    });
    addr
}

/// 50,000 idle TCP connections from 100 loopback addresses, against each backend, while
/// another client opens TCP connections to another service and asks over UDP through the
/// proxy: with the connection budget spent, the connections idle longest make room. The flood
/// lets go of the connections the proxy closes, as any client would.
#[test]
fn a_flood_of_50k_idle_tcp_connections_fails_no_other_client_and_leaves_nothing_behind() {
    let _alone = alone();
    for backend in ["epoll", "io_uring"] {
        let held: Held = Arc::new(Mutex::new(Some(Vec::new())));
        // Four endpoints, so that the proxy's ports towards them (held a minute by closed
        // connections) do not run out.
        let idle_endpoints: Vec<String> = (0..4)
            .map(|_| format!("{{ address = \"{}\" }}", holding_backend(&held)))
            .collect();
        let (echo, answering) = (echo_backend(), udp_backend(|d| d.starts_with(b"probe")));
        // The proxy's ports last: the backends' cannot take them meanwhile.
        let (idle_port, tcp_port, udp_port) = (free_port(), free_port(), free_port());
        let path = temp(&format!("idle50k-{backend}")).join("svcproxyd.toml");
        let text = format!(
            "[proxy]\nworkers = 2\n\n\
             [[services]]\nname = \"default/idle\"\naddresses = [\"127.0.0.1\"]\nports = [{{ port = {idle_port} }}]\nendpoints = [{}]\n\n\
             [[services]]\nname = \"default/web\"\naddresses = [\"127.0.0.1\"]\nports = [{{ port = {tcp_port} }}]\nendpoints = [{{ address = \"{echo}\" }}]\n\n\
             [[services]]\nname = \"default/dns\"\naddresses = [\"127.0.0.1\"]\nports = [{{ port = {udp_port}, protocol = \"UDP\" }}]\nendpoints = [{{ address = \"{answering}\" }}]\n",
            idle_endpoints.join(", "),
        );
        std::fs::write(&path, text).unwrap();
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut limited = Command::new("prlimit");
        // The flood's client sockets (the proxy's connections and its accept queues, up to
        // 2 x 4,096) and the backends' sockets fit this test's 20,000 descriptors.
        limited.arg("--nofile=10000:10000").arg(BIN);
        let d = Daemon::start_with(limited, &path, admin, &["--backend", backend]);
        let pid = d.child.id();
        let metrics = || http(d.metrics, "GET", "/metrics", "", "").1;
        let m = metrics();
        let (limit, reserve, max_connections) = (
            gauge(&m, "descriptor_limit"),
            gauge(&m, "descriptor_reserve"),
            gauge(&m, "max_connections"),
        );
        assert_eq!(limit, 10_000);
        let baseline = open_descriptors(pid);
        let flooding = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let client = probing_client(
            SocketAddr::from(([127, 0, 0, 1], tcp_port)),
            SocketAddr::from(([127, 0, 0, 1], udp_port)),
            flooding.clone(),
        );
        let idle_vip = socket2::SockAddr::from(SocketAddr::from(([127, 0, 0, 1], idle_port)));
        let mut flood = Vec::new();
        let (mut failed, mut peak) = (0u32, 0usize);
        let started = Instant::now();
        let deadline = started + Duration::from_secs(240);
        for i in 0..50_000u32 {
            assert!(
                Instant::now() < deadline,
                "{backend}: the flood took too long"
            );
            let source = std::net::Ipv4Addr::new(127, 0, 20, (i % 100) as u8 + 1);
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.bind(&SocketAddr::from((source, 0)).into()).unwrap();
            match s.connect_timeout(&idle_vip, Duration::from_secs(2)) {
                Ok(()) => {
                    let s = TcpStream::from(s);
                    s.set_nonblocking(true).unwrap();
                    flood.push(s);
                }
                Err(_) => failed += 1,
            }
            if i % 500 == 0 {
                drop_closed(&mut flood);
                peak = peak.max(open_descriptors(pid));
            }
        }
        flooding.store(false, std::sync::atomic::Ordering::SeqCst);
        let rounds = client.join().unwrap();
        let m = metrics();
        let idle = |name: &str| service_metric(&m, name, "default/idle");
        eprintln!(
            "{backend}: in {:?}, {} flood connections opened ({failed} connects failed), \
             {} evicted, {} limited, peak {peak} descriptors, {rounds} client rounds",
            started.elapsed(),
            idle("connections_total"),
            idle("evicted_total"),
            idle("limited_total"),
        );
        assert!(rounds > 0, "{backend}: the client ran");
        assert!(
            idle("evicted_total") > 0,
            "{backend}: more than fit, so some were evicted"
        );
        assert!(idle("connections_active") <= max_connections, "{backend}");
        assert!(
            peak <= baseline + (limit - reserve) as usize,
            "{backend}: {peak} descriptors, beyond the budget"
        );
        // After the flood: back to the idle baseline.
        drop(flood);
        *held.lock().unwrap() = None;
        eventually_within(
            Duration::from_secs(30),
            "the flood's connections to close",
            || service_metric(&metrics(), "connections_active", "default/idle") == 0,
        );
        eventually_within(
            Duration::from_secs(30),
            "the descriptors to come back",
            || open_descriptors(pid) <= baseline + 1,
        );
        assert_eq!(d.stop(), 0, "{backend}");
    }
}

/// Debian's Chromium, when installed; without it the test is skipped, except under CI.
fn chromium() -> Option<PathBuf> {
    let path = PathBuf::from("/usr/bin/chromium");
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must install chromium (the status page test)"
    );
    eprintln!("skipped: no /usr/bin/chromium");
    None
}

/// The status page in a real browser (headless Chromium): after three connections through
/// the proxy, the rendered page shows the service port serving with three connections, its
/// endpoint ready, and the table generation; a screenshot is saved beside the test's build.
#[test]
fn the_status_page_renders_services_endpoints_and_traffic_in_a_browser() {
    let Some(chromium) = chromium() else {
        return;
    };
    let _g = shared();
    let (d, vip, _, _) = echo_daemon("status", 1);
    for _ in 0..3 {
        let mut s = TcpStream::connect_timeout(&vip, TIMEOUT).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.write_all(b"x").unwrap();
        s.read_exact(&mut [0]).unwrap();
    }
    let url = format!("http://{}/", d.metrics);
    let profile = temp("status-browser");
    let browse = |extra: &[&str]| {
        let out = Command::new(&chromium)
            .args(["--headless", "--no-sandbox", "--disable-gpu"])
            .arg(format!("--user-data-dir={}", profile.display()))
            // Long enough for the page's first reads of /status.json.
            .arg("--virtual-time-budget=5000")
            .args(extra)
            .arg(&url)
            .output()
            .unwrap();
        assert!(out.status.success(), "chromium: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dom = browse(&["--dump-dom"]);
    let row = dom
        .split("<tr")
        .find(|r| r.contains("default/web "))
        .unwrap_or_else(|| panic!("no row for default/web in {dom}"));
    assert!(
        row.contains(r#"class="port""#) && row.contains(">serving<") && row.contains("<td>3</td>"),
        "{row}"
    );
    let endpoint = dom
        .split("<tr")
        .find(|r| r.contains(r#"class="endpoint""#))
        .unwrap_or_else(|| panic!("no endpoint row in {dom}"));
    assert!(
        endpoint.contains(">ready<") && endpoint.contains("<td>3</td>"),
        "{endpoint}"
    );
    assert!(dom.contains("generation 1 "), "{dom}");
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&screenshot);
    browse(&[
        "--window-size=1200,400",
        &format!("--screenshot={}", screenshot.display()),
    ]);
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    eprintln!("status page screenshot: {}", screenshot.display());
    let _ = std::fs::remove_dir_all(&profile);
    assert_eq!(d.stop(), 0);
}

/// The metric names an expression reads (`svcproxy_*`, `kubeproxy_*`).
fn metric_names(expr: &str) -> Vec<&str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("svcproxy_") || t.starts_with("kubeproxy_"))
        .collect()
}

/// Every expression of the Grafana dashboard in `deploy/grafana` reads metrics a running
/// svcproxyd exports, and every panel has one.
#[test]
fn the_grafana_dashboard_reads_only_metrics_svcproxyd_exports() {
    let _g = shared();
    let (d, _, _, _) = echo_daemon("dashboard", 1);
    let (_, page) = http(d.metrics, "GET", "/metrics", "", "");
    let exported: std::collections::BTreeSet<&str> = page
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/svcproxyd-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut exprs: Vec<(String, String)> = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap().to_string();
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for t in targets {
            exprs.push((title.clone(), t["expr"].as_str().unwrap().to_string()));
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(query) = variable["query"].as_str().filter(|q| q.contains('(')) {
            exprs.push(("variables".into(), query.to_string()));
        }
    }
    for (title, expr) in &exprs {
        let names = metric_names(expr);
        assert!(
            !names.is_empty(),
            "{title}: {expr} reads no svcproxyd metric"
        );
        for name in names {
            assert!(exported.contains(name), "{title}: {name} is not exported");
        }
    }
    assert!(exprs.len() >= 20, "{} expressions", exprs.len());
    assert_eq!(d.stop(), 0);
}

/// A Service and its EndpointSlice (to `backend`), the slice's change triggered at `triggered`.
fn manifest(port: u16, backend: SocketAddr, triggered: std::time::SystemTime) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
         spec: {{clusterIP: 127.0.0.1, ports: [{{port: {port}}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}, \
         annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{}\"}}}}\n\
         addressType: IPv4\nports: [{{port: {}}}]\nendpoints: [{{addresses: [{}]}}]\n",
        humantime::format_rfc3339_seconds(triggered),
        backend.port(),
        backend.ip()
    )
}

/// `kubeproxy_network_programming_duration_seconds` measures from an EndpointSlice's trigger
/// time to the publication of the endpoints it changed; a reload that leaves them as they
/// were adds nothing.
#[test]
fn network_programming_latency_counts_each_endpoint_change_from_its_trigger() {
    let _g = shared();
    let (a, b) = (echo_backend(), echo_backend());
    let port = free_port();
    let path = temp("programming").join("web.yaml");
    let ten_seconds_ago = std::time::SystemTime::now() - Duration::from_secs(10);
    std::fs::write(&path, manifest(port, a, ten_seconds_ago)).unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let d = Daemon::start(&path, admin, &[]);
    let programming = |d: &Daemon| -> (u64, f64) {
        let families = metric_families(d);
        let text = format!(
            "{}",
            families["kubeproxy_network_programming_duration_seconds"]
        );
        let value = |suffix: &str| -> f64 {
            text.lines()
                .find_map(|l| {
                    l.strip_prefix(&format!(
                        "kubeproxy_network_programming_duration_seconds{suffix} "
                    ))
                })
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {suffix} in {text}"))
        };
        (value("_count") as u64, value("_sum"))
    };
    let (count, sum) = programming(&d);
    assert_eq!(count, 1);
    assert!(
        (10.0..60.0).contains(&sum),
        "measured from the trigger: {sum} s"
    );
    // The same endpoints again (a newer trigger time, the file rewritten): nothing published,
    // nothing to count.
    let (generation, reloads) = (d.generation(), d.reloads());
    std::fs::write(&path, manifest(port, a, std::time::SystemTime::now())).unwrap();
    eventually("the reload", || d.reloads() > reloads);
    assert_eq!(
        d.generation(),
        generation,
        "an equal service changes nothing"
    );
    assert_eq!(programming(&d).0, 1);
    // New endpoints: counted.
    let reloads = d.reloads();
    std::fs::write(&path, manifest(port, b, std::time::SystemTime::now())).unwrap();
    eventually("the reload", || d.reloads() > reloads);
    assert_eq!(d.generation(), generation + 1);
    assert_eq!(programming(&d).0, 2);
    assert_eq!(d.stop(), 0);
}

/// A Node object among the manifests for this node: with the cluster autoscaler's
/// to-be-deleted taint, `/healthz` says 503 and `nodeEligible: false` (load balancers drain
/// the node) while `/livez` stays 200; without it, 200 again.
#[test]
fn a_node_being_removed_is_not_eligible_for_load_balancer_traffic() {
    let _g = shared();
    let port = free_port();
    let path = temp("eligible").join("cluster.yaml");
    let node = |taint: &str| {
        format!(
            "---\napiVersion: v1\nkind: Node\nmetadata: {{name: node-a}}\nspec: {{taints: [{{key: {taint}, effect: NoSchedule}}]}}\n"
        )
    };
    let now = std::time::SystemTime::now();
    let tainted = manifest(port, echo_backend(), now) + &node("ToBeDeletedByClusterAutoscaler");
    std::fs::write(&path, &tainted).unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let d = Daemon::start(&path, admin, &["--node-name", "node-a"]);
    let health = d.unhealthy();
    assert_eq!(health["nodeEligible"], false, "{health}");
    assert!(
        health["unhealthy"]
            .as_str()
            .unwrap()
            .contains("this node is being removed"),
        "{health}"
    );
    assert_eq!(http(d.health, "GET", "/livez", "", "").0, 200);
    let reloads = d.reloads();
    std::fs::write(
        &path,
        tainted.replace("ToBeDeletedByClusterAutoscaler", "other"),
    )
    .unwrap();
    eventually("the reload", || d.reloads() > reloads);
    let (status, body) = http(d.health, "GET", "/healthz", "", "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""nodeEligible":true"#), "{body}");
    assert_eq!(d.stop(), 0);
}

/// A UDP backend answering every datagram with its name.
fn named_udp_backend(name: &'static str) -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(name.as_bytes(), from);
        }
    });
    addr
}

/// A config with an upgrade socket, `workers` workers, a TCP service in front of two echo
/// backends and a UDP service in front of two named ones; its path, and the TCP and UDP
/// service addresses.
fn upgradable(name: &str, workers: usize) -> (PathBuf, SocketAddr, SocketAddr) {
    let dir = temp(name);
    let (tcp, udp) = (free_port(), free_port());
    let text = format!(
        "[proxy]\nworkers = {workers}\nshutdown_grace_s = 30\n\n\
         [upgrade]\nsocket = \"{}\"\n\n\
         [[services]]\nname = \"default/web\"\naddresses = [\"127.0.0.1\"]\nports = [{{ port = {tcp} }}]\nendpoints = [{{ address = \"{}\" }}, {{ address = \"{}\" }}]\n\n\
         [[services]]\nname = \"default/dns\"\naddresses = [\"127.0.0.1\"]\nports = [{{ port = {udp}, protocol = \"UDP\" }}]\nendpoints = [{{ address = \"{}\" }}, {{ address = \"{}\" }}]\n",
        dir.join("run/upgrade.sock").display(),
        echo_backend(),
        echo_backend(),
        named_udp_backend("a"),
        named_udp_backend("b"),
    );
    let path = dir.join("svcproxyd.toml");
    std::fs::write(&path, text).unwrap();
    (
        path,
        SocketAddr::from(([127, 0, 0, 1], tcp)),
        SocketAddr::from(([127, 0, 0, 1], udp)),
    )
}

/// One TCP connection to an echo service at `addr`: a byte sent and echoed.
fn echo_byte(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    if &b == b"x" {
        Ok(())
    } else {
        Err(std::io::Error::other("a wrong echo"))
    }
}

/// What the clients beside a takeover saw.
#[derive(Debug, Default)]
struct Seen {
    /// TCP connections that failed (refused, reset, or a wrong echo), with why.
    tcp_failures: Vec<String>,
    tcp_connections: u64,
    /// Bytes echoed intact on the long-lived streams.
    stream_bytes: u64,
    /// UDP questions without an answer within 5 s.
    udp_lost: u64,
    udp_answers: u64,
    /// UDP clients whose answers came from more than one endpoint.
    udp_moved: Vec<String>,
}

/// Clients that run until `stop` (each loop bounded to 100,000 rounds): `connectors` threads
/// opening TCP connections to `tcp` in a loop (a byte echoed on each), 4 long-lived streams
/// to `tcp` sending and checking a pattern, and 8 UDP clients with fixed source ports asking
/// `udp` one question at a time. Returns them, to join, and a count of rounds done so far.
fn clients_beside(
    tcp: SocketAddr,
    udp: SocketAddr,
    connectors: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (
    Vec<std::thread::JoinHandle<Seen>>,
    Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    const ROUNDS: u64 = 100_000;
    let rounds = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut threads = Vec::new();
    for _ in 0..connectors {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        threads.push(std::thread::spawn(move || {
            let mut seen = Seen::default();
            for _ in 0..ROUNDS {
                if stop.load(Relaxed) {
                    break;
                }
                match echo_byte(tcp) {
                    Ok(()) => seen.tcp_connections += 1,
                    Err(e) => seen.tcp_failures.push(e.to_string()),
                }
                rounds.fetch_add(1, Relaxed);
            }
            seen
        }));
    }
    for n in 0..4u8 {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        let mut s = TcpStream::connect_timeout(&tcp, TIMEOUT).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        threads.push(std::thread::spawn(move || {
            let mut seen = Seen::default();
            let chunk: Vec<u8> = (0..4096u32).map(|i| (i as u8) ^ n).collect();
            let mut back = vec![0u8; chunk.len()];
            for _ in 0..ROUNDS {
                if stop.load(Relaxed) {
                    break;
                }
                let round = s.write_all(&chunk).and_then(|()| s.read_exact(&mut back));
                match round {
                    Ok(()) if back == chunk => seen.stream_bytes += chunk.len() as u64,
                    Ok(()) => {
                        seen.tcp_failures
                            .push("a stream's bytes came back changed".into());
                        break;
                    }
                    Err(e) => {
                        seen.tcp_failures.push(format!("a stream: {e}"));
                        break;
                    }
                }
                rounds.fetch_add(1, Relaxed);
            }
            seen
        }));
    }
    for n in 0..8 {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        threads.push(std::thread::spawn(move || {
            let mut seen = Seen::default();
            let mut endpoints = std::collections::BTreeSet::new();
            for _ in 0..ROUNDS {
                if stop.load(Relaxed) {
                    break;
                }
                c.send_to(b"q", udp).unwrap();
                let mut reply = [0u8; 16];
                match c.recv_from(&mut reply) {
                    Ok((len, from)) if from == udp => {
                        seen.udp_answers += 1;
                        endpoints.insert(reply[..len].to_vec());
                    }
                    _ => seen.udp_lost += 1,
                }
                rounds.fetch_add(1, Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
            if endpoints.len() > 1 {
                seen.udp_moved.push(format!("client {n}: {endpoints:?}"));
            }
            seen
        }));
    }
    (threads, rounds)
}

/// Waits until the clients have done `more` rounds beyond where they are.
fn rounds_pass(rounds: &std::sync::atomic::AtomicU64, more: u64) {
    let from = rounds.load(std::sync::atomic::Ordering::Relaxed);
    eventually("the clients to make progress", || {
        rounds.load(std::sync::atomic::Ordering::Relaxed) >= from + more
    });
}

fn takeover_drops_nothing(backend: &str) {
    let _g = alone();
    let (config, tcp, udp) = upgradable(&format!("takeover-{backend}"), 2);
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let backend_arg = ["--backend", backend];
    let mut old = Daemon::start(&config, admin, &backend_arg);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (clients, rounds) = clients_beside(tcp, udp, 200, stop.clone());
    rounds_pass(&rounds, 2_000);
    let (_, before) = http(old.metrics, "GET", "/metrics", "", "");
    let web_before = service_metric(&before, "connections_total", "default/web");
    let generation_before = old.generation();

    let new = Daemon::spawn(Command::new(BIN), &config, old.endpoints(), &backend_arg);
    new.logged("took over from the previous svcproxyd");
    old.logged("handed over to a new svcproxyd");
    // The clients go on through the new daemon; the old one finishes its streams.
    rounds_pass(&rounds, 2_000);
    let health = new.health();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = Seen::default();
    for c in clients {
        let s = c.join().unwrap();
        seen.tcp_failures.extend(s.tcp_failures);
        seen.tcp_connections += s.tcp_connections;
        seen.stream_bytes += s.stream_bytes;
        seen.udp_lost += s.udp_lost;
        seen.udp_answers += s.udp_answers;
        seen.udp_moved.extend(s.udp_moved);
    }
    assert_eq!(
        old.exit_code("handing over"),
        0,
        "the old daemon drains and exits 0"
    );
    assert!(
        !new.log
            .lock()
            .unwrap()
            .contains("inherited sockets this table does not serve"),
        "every inherited socket was adopted"
    );
    assert!(seen.tcp_failures.is_empty(), "{:?}", seen.tcp_failures);
    assert_eq!(seen.udp_lost, 0, "no UDP reply lost");
    assert!(seen.udp_moved.is_empty(), "{:?}", seen.udp_moved);
    assert!(seen.tcp_connections > 0 && seen.stream_bytes > 0 && seen.udp_answers > 0);
    assert_eq!(
        health["backend"],
        if backend == "epoll" {
            "Epoll"
        } else {
            "IoUring"
        }
    );
    assert!(
        health["generation"].as_u64().unwrap() > generation_before,
        "generations go on: {health}"
    );
    let (_, after) = http(new.metrics, "GET", "/metrics", "", "");
    let web_after = service_metric(&after, "connections_total", "default/web");
    assert!(
        web_after > web_before,
        "counters go on: {web_before} before, {web_after} after"
    );
    assert_eq!(
        service_metric(&after, "datagrams_in_total", "default/dns"),
        seen.udp_answers,
        "every datagram is counted once, by one daemon or the other"
    );
    new.stop();
}

#[test]
fn a_takeover_drops_nothing_and_the_old_daemon_drains_and_exits_zero_epoll() {
    takeover_drops_nothing("epoll");
}

#[test]
fn a_takeover_drops_nothing_and_the_old_daemon_drains_and_exits_zero_io_uring() {
    takeover_drops_nothing("io_uring");
}

#[test]
fn a_refused_or_failed_takeover_leaves_the_old_daemon_serving() {
    let _g = shared();
    let (config, tcp, udp) = upgradable("takeover-fails", 2);
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let old = Daemon::start(&config, admin, &["--stay-after-handover"]);
    let ask_udp = |c: &std::net::UdpSocket| {
        c.send_to(b"q", udp).unwrap();
        let mut reply = [0u8; 16];
        let (len, _) = c.recv_from(&mut reply).expect("an answer");
        reply[..len].to_vec()
    };
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    let endpoint = ask_udp(&client);

    // Another worker count: refused, with the reason, before anything is handed over.
    let other = config.with_file_name("two-workers-less.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&other, text.replace("workers = 2", "workers = 1")).unwrap();
    let mut refused = Daemon::spawn(Command::new(BIN), &other, old.endpoints(), &[]);
    assert_eq!(refused.exit_code("a refused takeover"), 1);
    refused.logged("would run 1 worker threads, this one runs 2");

    // The new daemon fails after receiving the sockets (its metrics address is taken): the
    // old one receives UDP again, the same flow still goes to the same endpoint.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoints = Endpoints {
        metrics: taken.local_addr().unwrap(),
        ..old.endpoints()
    };
    let mut failed = Daemon::spawn(Command::new(BIN), &config, endpoints, &[]);
    assert_eq!(failed.exit_code("a failed takeover"), 1);
    failed.logged("received the sockets of the running svcproxyd");
    old.logged("serving on");
    for _ in 0..10 {
        assert_eq!(ask_udp(&client), endpoint);
        echo_byte(tcp).expect("TCP is served");
    }
    assert_eq!(http(old.health, "GET", "/healthz", "", "").0, 200);

    // And a takeover after those works. The old daemon, told to stay after handing over,
    // drains and waits for SIGTERM (as a DaemonSet's old pod, deleted by its controller).
    let new = Daemon::spawn(Command::new(BIN), &config, old.endpoints(), &[]);
    new.logged("took over from the previous svcproxyd");
    assert_eq!(
        ask_udp(&client),
        endpoint,
        "the flow went on in the new daemon"
    );
    old.logged("drained; staying, serving nothing, until SIGTERM");
    assert_eq!(old.stop(), 0);
    echo_byte(tcp).expect("the new daemon serves");
    new.stop();
}

/// Whether process `pid` has exited (gone, or a zombie nobody reaps).
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[test]
fn sigusr2_starts_the_binary_anew_which_takes_over_and_tells_systemd() {
    let _g = shared();
    let (config, tcp, _) = upgradable("sigusr2", 1);
    let notify = config.with_file_name("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    systemd.set_read_timeout(Some(TIMEOUT)).unwrap();
    let said = || {
        let mut buf = [0u8; 256];
        let n = systemd.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut command = Command::new(BIN);
    command.env("NOTIFY_SOCKET", &notify);
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut old = Daemon::start_with(command, &config, admin, &[]);
    assert_eq!(said(), "READY=1");

    let pid = rustix::process::Pid::from_raw(old.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::USR2).unwrap();
    let state = said();
    let new: u32 = state
        .strip_prefix("MAINPID=")
        .and_then(|s| s.strip_suffix("\nREADY=1"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the new process names itself: {state:?}"));
    assert_ne!(new, old.child.id());
    assert_eq!(old.exit_code("SIGUSR2"), 0);
    echo_byte(tcp).expect("the new process serves");
    assert_eq!(http(old.health, "GET", "/healthz", "", "").0, 200);
    let new_pid = rustix::process::Pid::from_raw(new as i32).unwrap();
    rustix::process::kill_process(new_pid, rustix::process::Signal::TERM).unwrap();
    eventually("the new process to exit", || exited(new));
}

#[test]
fn a_stale_upgrade_socket_means_a_cold_start() {
    let _g = shared();
    let (config, tcp, _) = upgradable("stale-socket", 1);
    let socket = config.with_file_name("run").join("upgrade.sock");
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    // What a crashed svcproxyd leaves: the socket file, and nobody listening on it.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let d = Daemon::start(&config, admin, &[]);
    d.logged("a new svcproxyd can take over here");
    echo_byte(tcp).expect("served after a cold start");
    assert_eq!(d.stop(), 0);
    assert!(
        !socket.exists(),
        "a daemon that did not hand over removes its socket"
    );
}
