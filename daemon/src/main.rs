//! svcproxyd: svcproxy as a standalone node proxy.
//!
//! - `svcproxyd demo`: a self-contained demo on loopback.
//! - `svcproxyd run --config PATH`: serve the services of a TOML config or of Kubernetes
//!   manifests (a YAML file or directory), reloaded when the files change or on SIGHUP; three
//!   HTTP endpoints: health (`/healthz`, `/livez`), metrics (`/metrics`) and the admin API
//!   (`/services`); as root, service addresses are captured on a dummy interface. SIGTERM or
//!   SIGINT drain and exit. With an upgrade socket, a new `svcproxyd run` takes the running
//!   one's sockets over, and the old one drains and exits 0 ([`svcproxyd::upgrade`]); SIGUSR2
//!   starts that new process from the binary on disk. Under systemd (`Type=notify`) it says
//!   when it serves ([`svcproxyd::notify`]).
//! - `svcproxyd check --config PATH`: validate a config and print what it would serve.
//!
//! Exit codes: 0 success; 1 a runtime failure (the proxy could not start or failed);
//! 2 a usage or configuration error at start.

#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use svcproxy::{BackendKind, Batch, Options, Proxy, Table, TableConfig};
use tracing::{error, info, warn};

use svcproxyd::config::{self, Settings};
use svcproxyd::daemon::{self, Daemon};
use svcproxyd::health_check::HealthChecks;
use svcproxyd::{capture, demo, http, notify, upgrade, watch};

#[derive(Parser)]
#[command(
    name = "svcproxyd",
    version,
    about = "svcproxy as a standalone node proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start backends on loopback, put services in front, drive traffic, print what happened.
    Demo {
        /// Seconds of traffic (1 to 3600).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=3600))]
        seconds: u64,
    },
    /// Serve the services of a config file or of Kubernetes manifests.
    Run(Box<RunArgs>),
    /// Check a config and print the services it describes.
    Check {
        /// A TOML config, a YAML manifest, or a directory of manifests.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// A TOML config, a YAML manifest, or a directory of manifests (watched for changes).
    #[arg(long, required_unless_present_any = ["kubeconfig", "in_cluster"])]
    config: Option<PathBuf>,
    /// Watch the Kubernetes API of this kubeconfig's current context.
    #[arg(long, conflicts_with = "in_cluster")]
    kubeconfig: Option<PathBuf>,
    /// Watch the Kubernetes API as a pod (its service account, KUBERNETES_SERVICE_HOST).
    #[arg(long)]
    in_cluster: bool,
    /// This node's name (Kubernetes manifests; a TOML config sets `node.name`).
    #[arg(long)]
    node_name: Option<String>,
    /// Where node ports are served (repeatable; default 0.0.0.0).
    #[arg(long = "node-address")]
    node_addresses: Vec<IpAddr>,
    /// This node's zone, for topology hints (default: its Node object's
    /// topology.kubernetes.io/zone label, when the manifests have it).
    #[arg(long)]
    node_zone: Option<String>,
    /// A pod or node network of the cluster (repeatable): clients there are in-cluster.
    #[arg(long = "cluster-cidr")]
    cluster_cidrs: Vec<ipnet::IpNet>,
    /// Health endpoint address: /healthz and /livez (default 0.0.0.0:10256, kube-proxy's).
    #[arg(long)]
    health: Option<SocketAddr>,
    /// Metrics endpoint address: /metrics (default 127.0.0.1:10249, kube-proxy's).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Admin API address: /services (default 127.0.0.1:10262).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// File holding the admin bearer token (required for a non-loopback admin address).
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Backend: auto, epoll or io_uring.
    #[arg(long)]
    backend: Option<String>,
    /// Do not put service addresses on a dummy interface, even as root.
    #[arg(long)]
    no_capture: bool,
    /// Connect to endpoints from the client's address (root; see the README for the routing).
    #[arg(long)]
    preserve_client_ip: bool,
    /// How captured service addresses are listened on: transparent (a few tproxy listeners
    /// for them all, the default) or per-frontend (one listener per service port and worker).
    #[arg(long)]
    listeners: Option<String>,
    /// Where a new svcproxyd takes this one's sockets over (and this one a running one's).
    #[arg(long)]
    upgrade_socket: Option<PathBuf>,
    /// After handing over and draining, wait for SIGTERM instead of exiting.
    #[arg(long)]
    stay_after_handover: bool,
    /// Balance node-local clients at the socket: cgroup BPF programs connect them straight
    /// to an endpoint (root; README, Socket-level load balancing).
    #[arg(long)]
    socket_lb: bool,
    /// The cgroup v2 directory whose processes --socket-lb serves (default: the cgroup v2
    /// root, every process); implies --socket-lb.
    #[arg(long)]
    socket_lb_cgroup: Option<PathBuf>,
}

/// Attaches socket-level load balancing as `settings` ask; a failure is logged and returned,
/// and the proxy serves every client as before.
fn attach_socket_lb(proxy: &Proxy, settings: &Settings) -> Result<(), String> {
    let cgroup = match &settings.socket_lb_cgroup {
        Some(c) => c.clone(),
        None => svcproxy::socket_lb::cgroup2_mount().map_err(|e| e.to_string())?,
    };
    proxy.attach_socket_lb(&cgroup).map_err(|e| {
        let reason = e.to_string();
        warn!("socket-level load balancing is off, every client goes through the proxy: {reason}");
        reason
    })
}

fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    match Cli::parse().command {
        Command::Demo { seconds } => match demo::run(Duration::from_secs(seconds)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!("demo failed: {e}");
                ExitCode::from(1)
            }
        },
        Command::Check { config } => match config::load(&config) {
            Ok(loaded) => check(&loaded),
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Run(args) => run(*args),
    }
}

/// `svcproxyd check`: the warnings, then every object `run` would leave out (exit 2 if any),
/// or the services and their frontends.
fn check(loaded: &config::Loaded) -> ExitCode {
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    if !loaded.skipped.is_empty() {
        for e in &loaded.skipped {
            eprintln!("{e}");
        }
        return ExitCode::from(2);
    }
    let table = Table::new(TableConfig {
        node_name: loaded.settings.as_ref().and_then(|s| s.node_name.clone()),
        ..TableConfig::default()
    });
    match table.apply(loaded.changes().into_iter().collect::<svcproxy::Batch>()) {
        Ok(_) => {
            for s in table.load().services() {
                let frontends = s
                    .spec()
                    .frontends(&[])
                    .map(|f| f.key.to_string())
                    .collect::<Vec<_>>();
                println!(
                    "{}: {} endpoints, {}",
                    s.name(),
                    s.endpoints().len(),
                    frontends.join(" ")
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}", daemon::explain(&e, loaded));
            ExitCode::from(2)
        }
    }
}

/// Settings from the config file (TOML) or the defaults, with command-line overrides.
fn settings(args: &RunArgs, loaded: &config::Loaded) -> Result<Settings, String> {
    let mut s = loaded.settings.clone().unwrap_or_default();
    if let Some(n) = &args.node_name {
        s.node_name = Some(n.clone());
    }
    if !args.node_addresses.is_empty() {
        s.node_addresses = args.node_addresses.clone();
    }
    if let Some(z) = &args.node_zone {
        s.node_zone = Some(z.clone());
    }
    if !args.cluster_cidrs.is_empty() {
        s.cluster_ranges = args.cluster_cidrs.clone();
    }
    if s.node_zone.is_none()
        && let Some(name) = &s.node_name
    {
        s.node_zone = loaded.nodes.get(name).and_then(|n| n.zone.clone());
    }
    if let Some(a) = args.health {
        s.health = a;
    }
    if let Some(a) = args.metrics {
        s.metrics = a;
    }
    if let Some(a) = args.admin {
        s.admin = a;
    }
    if let Some(f) = &args.admin_token_file {
        let t = std::fs::read_to_string(f)
            .map_err(|e| format!("--admin-token-file {}: {e}", f.display()))?;
        s.admin_token = Some(t.trim().to_string());
    }
    if let Some(b) = &args.backend {
        s.backend = match b.as_str() {
            "auto" => BackendKind::Auto,
            "epoll" => BackendKind::Epoll,
            "io_uring" => BackendKind::IoUring,
            other => return Err(format!("--backend {other:?}: use auto, epoll or io_uring")),
        };
    }
    if args.no_capture {
        s.capture = false;
    }
    if args.preserve_client_ip {
        s.proxy.preserve_client_ip = true;
    }
    if let Some(path) = &args.upgrade_socket {
        s.upgrade_socket = Some(path.clone());
    }
    if args.stay_after_handover {
        s.stay_after_handover = true;
    }
    if args.socket_lb || args.socket_lb_cgroup.is_some() {
        s.socket_lb = true;
    }
    if let Some(cgroup) = &args.socket_lb_cgroup {
        s.socket_lb_cgroup = Some(cgroup.clone());
    }
    if let Some(listeners) = &args.listeners {
        let port = s
            .transparent_port
            .unwrap_or(config::DEFAULT_TRANSPARENT_PORT);
        s.transparent_port =
            config::parse_listeners(listeners, port).map_err(|e| format!("--listeners: {e}"))?;
    }
    if !s.admin.ip().is_loopback() && s.admin_token.as_deref().is_none_or(str::is_empty) {
        return Err(format!(
            "the admin address {} is not loopback: set a bearer token (admin.token_file or --admin-token-file)",
            s.admin
        ));
    }
    Ok(s)
}

/// The name the health check node ports' listeners are handed over by.
const HEALTH_CHECK: &str = "health-check-node-port";

/// Answers a new svcproxyd asking on `channel` for this one's sockets (with the HTTP
/// endpoints' listeners, from `servers`); whether this one handed over (it has retired, and
/// `servers` are stopped).
fn hand_over(
    daemon: &Daemon,
    channel: svcproxy_sys::fd_passing::Channel,
    servers: &mut Vec<(&str, http::Server)>,
) -> bool {
    let mut listeners: Vec<(String, std::net::TcpListener)> = servers
        .iter()
        .filter_map(|(what, s)| Some((what.to_string(), s.listener().try_clone().ok()?)))
        .collect();
    listeners.extend(
        daemon
            .health_check_listeners()
            .into_iter()
            .map(|l| (HEALTH_CHECK.to_string(), l)),
    );
    let capture = daemon.capture_state();
    match upgrade::hand_over(channel, &daemon.proxy, &daemon.table, capture, &listeners) {
        Ok(handing) => {
            let to = handing.to;
            if !daemon.proxy.retire(upgrade::WORKERS_TIMEOUT) {
                warn!("some workers still had accepts in flight when handing over");
            }
            if let Err(e) = handing.done() {
                warn!("cannot tell the new svcproxyd it may serve ({e}); serving on");
                daemon.proxy.resume();
                return false;
            }
            daemon.handed_over(to);
            servers.clear();
            info!(to, "handed over to a new svcproxyd");
            true
        }
        Err(e) => {
            warn!("{e}; serving on");
            false
        }
    }
}

/// SIGUSR2: starts a new svcproxyd from the binary at this one's path (an upgraded one, say),
/// with the same arguments, to take over.
fn start_successor(upgradable: bool) -> Option<std::process::Child> {
    if !upgradable {
        warn!("SIGUSR2: a takeover needs an upgrade socket (--upgrade-socket, [upgrade] socket)");
        return None;
    }
    match upgrade::start_successor() {
        Ok(child) => {
            info!(
                pid = child.id(),
                "SIGUSR2: started a new svcproxyd to take over"
            );
            Some(child)
        }
        Err(e) => {
            warn!("SIGUSR2: cannot start a new svcproxyd: {e}");
            None
        }
    }
}

/// How often the config files are looked at, and the loop's longest wait.
const POLL: Duration = Duration::from_millis(200);

/// The first update of `watch`: the API listed whole. Waits for it, saying why every
/// [`WAIT_REPORT`]; `Err` with the exit code if asked to stop (`term`) meanwhile, or if the
/// watch stopped.
fn first_update(watch: &watch::Watch, term: &AtomicBool) -> Result<watch::Update, ExitCode> {
    let mut report = Instant::now() + WAIT_REPORT;
    while !term.load(Ordering::SeqCst) {
        match watch.updates.recv_timeout(POLL) {
            Ok(update) => return Ok(update),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                error!("the Kubernetes API watch stopped before listing");
                return Err(ExitCode::from(1));
            }
        }
        if Instant::now() >= report {
            report += WAIT_REPORT;
            let status = watch.status.lock().map(|s| s.clone()).unwrap_or_default();
            let why = status.last_error.map(|(_, e)| e).unwrap_or_default();
            info!("waiting for the Kubernetes API to list services and endpoint slices {why}");
        }
    }
    Err(ExitCode::SUCCESS)
}

/// How often the wait for the API's first list says why.
const WAIT_REPORT: Duration = Duration::from_secs(10);

/// What answers the requests of one of the daemon's HTTP endpoints.
type Handler = fn(&Daemon, &http::Request) -> http::Response;

fn run(args: RunArgs) -> ExitCode {
    // Handled from the start, before anyone can be told that svcproxyd is up (systemd, or a
    // client of its endpoints): a signal sent at once must not meet the default action, which
    // ends the process. One that comes while it starts is acted on once it serves.
    let term = Arc::new(AtomicBool::new(false));
    let hup = Arc::new(AtomicBool::new(false));
    let usr2 = Arc::new(AtomicBool::new(false));
    for (signal, flag) in [
        (signal_hook::consts::SIGTERM, &term),
        (signal_hook::consts::SIGINT, &term),
        (signal_hook::consts::SIGHUP, &hup),
        (signal_hook::consts::SIGUSR2, &usr2),
    ] {
        if let Err(e) = signal_hook::flag::register(signal, flag.clone()) {
            error!("cannot handle signal {signal}: {e}");
            return ExitCode::from(1);
        }
    }

    // Taken before the files are read: a change made while svcproxyd starts is reloaded.
    let mut seen = args.config.as_deref().map(config::signature);
    let mut reader = config::Reader::default();
    let loaded = match args.config.as_deref().map(|path| reader.load(path)) {
        Some(Ok(l)) => l,
        None => config::Loaded::default(),
        Some(Err(e)) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut settings = match settings(&args, &loaded) {
        Ok(s) => s,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    let connect = match (&args.kubeconfig, args.in_cluster) {
        (Some(path), _) => Some(watch::Connect::Kubeconfig(path.clone())),
        (None, true) => Some(watch::Connect::InCluster),
        (None, false) => None,
    };
    let watch = match connect.map(|c| watch::start(&c, settings.node_name.clone())) {
        Some(Ok(w)) => Some(w),
        None => None,
        Some(Err(e)) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    // Nothing is served before the API was listed whole (a takeover: the running svcproxyd
    // serves meanwhile).
    let first = match &watch {
        Some(w) => match first_update(w, &term) {
            Ok(u) => Some(u),
            Err(code) => return code,
        },
        None => None,
    };
    if settings.node_zone.is_none()
        && let Some(zone) = first.as_ref().and_then(|u| u.node.as_ref()?.zone.clone())
    {
        settings.node_zone = Some(zone);
    }
    // As many descriptors as the hard limit allows (the proxy splits them: README, limits),
    // before sockets are handed over.
    match svcproxy::raise_descriptor_limit() {
        Ok(limit) => info!(limit, "descriptor limit"),
        Err(e) => warn!("cannot raise the descriptor limit to the hard limit: {e}"),
    }
    let mut inheritance = match &settings.upgrade_socket {
        Some(path) => match upgrade::take_over(path, settings.proxy.worker_count()) {
            Ok(i) => i,
            Err(e) => {
                error!("cannot take over from the running svcproxyd: {e}");
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    let root = rustix::process::geteuid().is_root();
    let captured = inheritance.as_mut().and_then(|i| i.capture.take());
    let capture = if settings.capture && root {
        // Transparent listeners need the steering that capture installs.
        settings.proxy.transparent_port = settings.transparent_port;
        let steering = settings.proxy.steering();
        let preserve = settings.proxy.preserve_client_ip;
        let made = match captured {
            Some(state) => capture::Capture::adopt(state, steering, preserve),
            None => capture::Capture::new(&settings.interface, steering, preserve),
        };
        match made {
            Ok(c) => Some(c),
            Err(e) => {
                error!("cannot capture service addresses: {e}");
                return ExitCode::from(1);
            }
        }
    } else if captured.is_some() {
        error!(
            "the running svcproxyd captures service addresses and this one would not (not root, or capture off): a takeover needs the same capture settings"
        );
        return ExitCode::from(1);
    } else {
        if !root {
            warn!(
                "not root: cluster IPs are not captured; only listen addresses and node ports are reachable"
            );
        }
        None
    };
    if settings.proxy.preserve_client_ip && capture.is_none() {
        warn!(
            "client source preservation needs root and capture; backends see the proxy's address"
        );
    }
    let table_config = TableConfig {
        node_name: settings.node_name.clone(),
        node_addresses: settings.node_addresses.clone(),
        node_zone: settings.node_zone.clone(),
        cluster_ranges: settings.cluster_ranges.clone(),
    };
    let table = Arc::new(match &inheritance {
        Some(i) => Table::continuing(table_config, i.generation),
        None => Table::new(table_config),
    });
    let mut inherited = Vec::new();
    if let Some(i) = inheritance.as_mut() {
        // Workers adopt the inherited sockets as they open the table's frontends: the table
        // is published before they start.
        if let Err(e) = table.apply(loaded.changes().into_iter().collect::<Batch>()) {
            error!("{}", daemon::explain(&e, &loaded));
            return ExitCode::from(2);
        }
        if let Some(update) = &first {
            let mut publisher = svcproxyd::publish::Publisher::default();
            let apply = |batch| table.apply(batch).map(|p| p.generation);
            if let Err(e) = publisher.publish(&table, update.wanted.clone(), true, apply) {
                error!("the Kubernetes API's services: {e}");
                return ExitCode::from(1);
            }
        }
        let matched = table.load().carry_stats(&i.stats);
        info!(service_ports = matched, "counters carried over");
        inherited = std::mem::take(&mut i.sockets);
    }
    let options = Options {
        backend: settings.backend,
        config: settings.proxy,
    };
    let proxy = match Proxy::start_inheriting(table.clone(), options, inherited) {
        Ok(p) => p,
        Err(e) => {
            error!("cannot start the proxy: {e}");
            return ExitCode::from(1);
        }
    };
    let socket_lb = settings
        .socket_lb
        .then(|| attach_socket_lb(&proxy, &settings));
    info!(backend = ?proxy.backend(), config = ?args.config, kubernetes = watch.is_some(), "svcproxyd running");
    let daemon = Arc::new(Daemon::new(
        table,
        proxy,
        capture,
        settings.admin_token.clone(),
        settings.pending_timeout,
    ));
    if let Some(Err(reason)) = socket_lb {
        daemon.socket_lb_failed(reason);
    }
    let weak = Arc::downgrade(&daemon);
    let mut health_checks = HealthChecks::new(settings.node_addresses.clone(), move || {
        weak.upgrade().is_some_and(|d| d.unhealthy().is_none())
    });
    if let Some(i) = inheritance.as_mut() {
        health_checks.inherit(i.http_listeners(HEALTH_CHECK));
    }
    daemon.serve_health_checks(health_checks);
    if let Err(e) = daemon.load(&loaded) {
        error!("{e}");
        return ExitCode::from(2);
    }
    info!(services = loaded.services.len(), "configuration loaded");
    if let (Some(w), Some(update)) = (&watch, first) {
        daemon.watching(w.status.clone());
        let services = update.wanted.len();
        if let Err(e) = daemon.api_update(update) {
            error!("the Kubernetes API's services: {e}");
            return ExitCode::from(1);
        }
        info!(services, "the Kubernetes API's services loaded");
    }
    // Each with the name its listener is handed over by (the same in every release).
    let endpoints: [(&str, &str, SocketAddr, Handler); 3] = [
        (
            "health",
            "health endpoint (/healthz, /livez)",
            settings.health,
            Daemon::health,
        ),
        (
            "metrics",
            "metrics endpoint (/metrics)",
            settings.metrics,
            Daemon::metrics,
        ),
        (
            "admin",
            "admin endpoint (/services)",
            settings.admin,
            Daemon::admin,
        ),
    ];
    let mut servers = Vec::new();
    for (name, what, address, handler) in endpoints {
        let d = daemon.clone();
        let handler = move |r: &http::Request| handler(&d, r);
        let inherited = inheritance
            .as_mut()
            .and_then(|i| i.http_listener(name, address));
        let started = match inherited {
            Some(listener) => http::Server::start_on(listener, handler),
            None => http::Server::start(address, handler),
        };
        match started {
            Ok(s) => {
                info!(address = %s.addr(), "{what}");
                servers.push((name, s));
            }
            Err(e) => {
                error!(%address, "cannot serve the {what}: {e}");
                return ExitCode::from(1);
            }
        }
    }

    let took_over = inheritance.is_some();
    if let Some(i) = inheritance {
        let from = i.from;
        match i.ready() {
            Ok(()) => info!(
                from,
                "took over from the previous svcproxyd; it drains and exits"
            ),
            Err(e) if from.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) => {
                warn!(
                    from,
                    "the previous svcproxyd went away during the handover ({e}); serving"
                )
            }
            Err(e) => {
                error!(
                    from,
                    "the previous svcproxyd did not confirm the handover ({e}); it may serve still, so this one does not"
                );
                return ExitCode::from(1);
            }
        }
        daemon.own_capture();
        daemon.proxy.begin_serving();
    }
    let upgrades = match &settings.upgrade_socket {
        Some(path) => match upgrade::listen(path) {
            Ok(l) => {
                info!(socket = %path.display(), "a new svcproxyd can take over here");
                Some(l)
            }
            Err(e) if took_over => {
                // The old process has retired: this one serves, upgradable or not.
                error!(socket = %path.display(), "cannot listen for a takeover: {e}; the next start is a cold one");
                None
            }
            Err(e) => {
                error!(socket = %path.display(), "cannot listen for a takeover: {e}");
                return ExitCode::from(1);
            }
        },
        None => None,
    };

    let state = if took_over {
        notify::took_over()
    } else {
        "READY=1".to_string()
    };
    if let Err(e) = notify::notify(&state) {
        warn!("cannot tell systemd: {e}");
    }

    let mut settling = None;
    let mut failed = false;
    let mut handed_over = false;
    let mut successor = None;
    let mut next_poll = Instant::now();
    while !term.load(Ordering::SeqCst) {
        match watch.as_ref().map(|w| w.updates.recv_timeout(POLL)) {
            Some(Ok(update)) => {
                if let Err(e) = daemon.api_update(update) {
                    error!("the Kubernetes API's services: {e}");
                }
            }
            Some(Err(RecvTimeoutError::Timeout)) => {}
            Some(Err(RecvTimeoutError::Disconnected)) => {
                error!("the Kubernetes API watch stopped: stopping, so that it is started again");
                failed = true;
                break;
            }
            None => std::thread::sleep(POLL),
        }
        daemon.observe_applied();
        if let Some(channel) = upgrades.as_ref().and_then(|l| match l.accept() {
            Ok(c) => c,
            Err(e) => {
                warn!("takeover socket: {e}");
                None
            }
        }) && hand_over(&daemon, channel, &mut servers)
        {
            handed_over = true;
            break;
        }
        if usr2.swap(false, Ordering::SeqCst) {
            successor = start_successor(upgrades.is_some());
        }
        if let Some(child) = &mut successor
            && let Ok(Some(status)) = child.try_wait()
        {
            warn!(%status, "the new svcproxyd exited without taking over");
            successor = None;
        }
        if let Some(down) = daemon.proxy.down() {
            error!(
                "{down}: stopping, so that what supervises svcproxyd (systemd, the kubelet) starts it again"
            );
            failed = true;
            break;
        }
        let Some(path) = &args.config else { continue };
        if Instant::now() < next_poll {
            continue;
        }
        next_poll = Instant::now() + POLL;
        let now = Some(config::signature(path));
        let asked = hup.swap(false, Ordering::SeqCst);
        if now != seen && !asked && settling.as_ref() != Some(&now) {
            // A file is being written: read it once it has stayed the same for one poll.
            settling = Some(now);
            continue;
        }
        if now == seen && !asked {
            continue;
        }
        settling = None;
        seen = now;
        let outcome = reader
            .load(path)
            .map_err(|e| e.to_string())
            .and_then(|loaded| {
                if loaded
                    .settings
                    .as_ref()
                    .is_some_and(|s| s.proxy != settings.proxy)
                {
                    warn!("proxy settings changed in the config: they apply after a restart");
                }
                daemon.load(&loaded)
            });
        daemon.reloaded(outcome);
    }
    // The endpoints stay up while connections drain, /healthz answering 503.
    info!(grace = ?settings.shutdown_grace, "shutting down");
    daemon.stopping.store(true, Ordering::SeqCst);
    if !daemon.proxy.drain(settings.shutdown_grace) {
        info!("the grace period ended; closing the connections left");
    }
    drop(servers);
    if handed_over && settings.stay_after_handover {
        info!("drained; staying, serving nothing, until SIGTERM");
        while !term.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    if !handed_over && let Some(l) = &upgrades {
        let _ = std::fs::remove_file(l.path());
    }
    let Ok(daemon) = Arc::try_unwrap(daemon) else {
        error!("an HTTP endpoint still holds the daemon");
        return ExitCode::from(1);
    };
    let stopped = daemon.proxy.shutdown(Duration::ZERO);
    if let Err(e) = &stopped {
        error!("shutdown: {e}");
    }
    info!("stopped");
    if failed || stopped.is_err() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
