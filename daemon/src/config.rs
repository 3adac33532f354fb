//! What `svcproxyd run --config PATH` reads: svcproxyd's own TOML file, or Kubernetes
//! manifests (a YAML file, or a directory of them).
//!
//! The TOML schema (every section optional):
//!
//! ```toml
//! [proxy]                     # read at start; changes need a restart
//! backend = "auto"            # auto | epoll | io_uring
//! workers = 0                 # 0: one per CPU; at most 1024
//! connect_timeout_ms = 1000   # 1 to 600000
//! connect_attempts = 3        # 1 to 8
//! idle_timeout_s = 3600       # 0: never; at most 31536000 (365 days)
//! udp_idle_timeout_s = 30     # 1 to 86400
//! max_connections = 1048576   # 1 to 16777216, lowered to what the descriptor limit allows
//! max_connections_per_client = 0  # per client address; 0: a quarter of max_connections
//! max_udp_flows = 65536       # per worker; 1 to 16777216, lowered likewise
//! max_udp_flows_per_client = 0  # per worker and client address; 0: a quarter of max_udp_flows
//! drain_close_after_s = 0     # 0: connections to removed endpoints run on; at most 86400
//! shutdown_grace_s = 5        # 0 to 3600
//!
//! [node]
//! name = "node-a"             # for traffic policy Local
//! addresses = ["0.0.0.0"]     # where node ports are served
//! zone = "zone-a"             # for topology hints (default: this node's Node object's
//!                             # topology.kubernetes.io/zone label, among the manifests)
//! cluster_cidrs = ["198.18.0.0/16"]  # pod and node networks: their clients are in-cluster
//!                             # (externalTrafficPolicy Local short-circuits to Cluster)
//!
//! [health]                    # /healthz and /livez, read-only, as kube-proxy's
//! listen = "0.0.0.0:10256"
//! pending_timeout_s = 60      # /healthz says 503 when a change waits longer; 1 to 3600
//!
//! [metrics]                   # /metrics and the status page (/), read-only
//! listen = "127.0.0.1:10249"
//!
//! [admin]                     # the writable API (/services)
//! listen = "127.0.0.1:10262"  # a non-loopback address needs a token
//! token_file = "/etc/svcproxyd/token"
//!
//! [capture]
//! cluster_ips = true          # as root: capture service addresses (nftables, see listeners)
//! interface = "svcproxy0"
//! preserve_client_ip = false  # as root: backends see the client's IP (see README)
//! listeners = "transparent"   # a few tproxy listeners for every service address, or
//!                             # "per-frontend": addresses on a dummy interface, and one
//!                             # listener per service port and worker
//! transparent_port = 10263    # where the transparent listeners listen (loopback)
//!
//! [upgrade]                   # restarts and upgrades that drop nothing (README, Upgrading)
//! socket = "/run/svcproxyd/upgrade.sock"  # where a new svcproxyd asks for the sockets;
//!                             # unset: each start is a cold one
//! stay_after_handover = false # after handing over and draining, wait for SIGTERM instead
//!                             # of exiting (a DaemonSet's old pod, deleted by its controller)
//!
//! [socket_lb]                 # as root: node-local clients connect straight to an endpoint
//! enabled = false             # (cgroup BPF; README, Socket-level load balancing)
//! cgroup = "/sys/fs/cgroup"   # whose processes; default: the cgroup v2 root (every process)
//!
//! manifests = "k8s/"          # also read Kubernetes manifests (relative to this file)
//!
//! [[services]]                # the table schema shared with the admin API and the C/Go API
//! name = "default/web"
//! addresses = ["198.18.0.10"]
//! ports = [{ name = "http", port = 80, target_port = 8080 }]
//! endpoints = [{ address = "198.19.1.5" }, { address = "198.19.2.7" }]
//! ```
//!
//! Errors name the file and the field.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use serde::Deserialize;
use svcproxy::core::Change;
use svcproxy::core::error::clip;
use svcproxy::{BackendKind, DrainPolicy, Forwarding, ProxyConfig};
use svcproxy_core::config::UDP_IDLE_TIMEOUT_RANGE;
use svcproxy_core::schema::ServiceDoc;
use svcproxy_core::session::{
    CONNECT_TIMEOUT_RANGE, DRAIN_RANGE, IDLE_TIMEOUT_RANGE, check_duration,
};

use crate::objects::{self, Node};
use crate::publish::wanted;

/// How long shutdown may wait for connections: up to 1 hour.
pub const SHUTDOWN_GRACE_RANGE: RangeInclusive<Duration> =
    Duration::ZERO..=Duration::from_secs(3600);

/// The health endpoint's default address: kube-proxy's (`--healthz-bind-address`).
pub const DEFAULT_HEALTH: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 10256);

/// The metrics endpoint's default address: kube-proxy's (`--metrics-bind-address`).
pub const DEFAULT_METRICS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 10249);

/// The admin endpoint's default address: a port of svcproxyd's own, beside kube-proxy's.
pub const DEFAULT_ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 10262);

/// How long a change may wait for the data path before `/healthz` says 503: 1 s to 1 hour.
pub const PENDING_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    proxy: ProxySection,
    #[serde(default)]
    node: NodeSection,
    #[serde(default)]
    health: HealthSection,
    #[serde(default)]
    metrics: MetricsSection,
    #[serde(default)]
    admin: AdminSection,
    #[serde(default)]
    capture: CaptureSection,
    #[serde(default)]
    upgrade: UpgradeSection,
    #[serde(default)]
    socket_lb: SocketLbSection,
    manifests: Option<PathBuf>,
    #[serde(default)]
    services: Vec<ServiceDoc>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
struct ProxySection {
    backend: String,
    workers: usize,
    connect_timeout_ms: u64,
    connect_attempts: u32,
    idle_timeout_s: u64,
    udp_idle_timeout_s: u64,
    max_connections: usize,
    max_connections_per_client: usize,
    max_udp_flows: usize,
    max_udp_flows_per_client: usize,
    drain_close_after_s: u64,
    shutdown_grace_s: u64,
    forwarding: String,
}

impl Default for ProxySection {
    fn default() -> Self {
        let d = ProxyConfig::default();
        Self {
            backend: "auto".into(),
            workers: 0,
            connect_timeout_ms: d.tcp.connect_timeout.as_millis() as u64,
            connect_attempts: d.tcp.connect_attempts,
            idle_timeout_s: d.tcp.idle_timeout.map_or(0, |t| t.as_secs()),
            udp_idle_timeout_s: d.udp_idle_timeout.as_secs(),
            max_connections: d.max_connections,
            max_connections_per_client: d.max_connections_per_client,
            max_udp_flows: d.max_udp_flows,
            max_udp_flows_per_client: d.max_udp_flows_per_client,
            drain_close_after_s: 0,
            shutdown_grace_s: 5,
            forwarding: "buffers".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct NodeSection {
    name: Option<String>,
    addresses: Option<Vec<IpAddr>>,
    zone: Option<String>,
    #[serde(default)]
    cluster_cidrs: Vec<IpNet>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct AdminSection {
    listen: Option<SocketAddr>,
    token: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
struct HealthSection {
    listen: SocketAddr,
    pending_timeout_s: u64,
}

impl Default for HealthSection {
    fn default() -> Self {
        Self {
            listen: DEFAULT_HEALTH,
            pending_timeout_s: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
struct MetricsSection {
    listen: SocketAddr,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self {
            listen: DEFAULT_METRICS,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct UpgradeSection {
    socket: Option<PathBuf>,
    #[serde(default)]
    stay_after_handover: bool,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
struct SocketLbSection {
    enabled: bool,
    cgroup: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
struct CaptureSection {
    cluster_ips: bool,
    interface: String,
    preserve_client_ip: bool,
    listeners: String,
    transparent_port: u16,
}

/// Where transparent listeners listen by default (beside kube-proxy's 10256 and 10249, and
/// the admin endpoint's 10262).
pub const DEFAULT_TRANSPARENT_PORT: u16 = 10263;

impl Default for CaptureSection {
    fn default() -> Self {
        Self {
            cluster_ips: true,
            interface: "svcproxy0".into(),
            preserve_client_ip: false,
            listeners: "transparent".into(),
            transparent_port: DEFAULT_TRANSPARENT_PORT,
        }
    }
}

/// The `listeners` setting: the transparent port, or `None` for a listener per frontend.
pub fn parse_listeners(value: &str, port: u16) -> Result<Option<u16>, String> {
    match value {
        "transparent" if port == 0 => Err("transparent_port is 0".into()),
        "transparent" => Ok(Some(port)),
        "per-frontend" => Ok(None),
        other => Err(format!("{other:?} is not transparent or per-frontend")),
    }
}

/// Settings read once, at start.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Backend.
    pub backend: BackendKind,
    /// Proxy settings.
    pub proxy: ProxyConfig,
    /// How long shutdown waits for connections.
    pub shutdown_grace: Duration,
    /// This node's name.
    pub node_name: Option<String>,
    /// Node port addresses.
    pub node_addresses: Vec<IpAddr>,
    /// This node's zone (else its Node object's, when the manifests have it).
    pub node_zone: Option<String>,
    /// The cluster's address ranges: clients there are inside the cluster.
    pub cluster_ranges: Vec<IpNet>,
    /// Health endpoint address (`/healthz`, `/livez`).
    pub health: SocketAddr,
    /// How long a change may wait for the data path before `/healthz` says 503.
    pub pending_timeout: Duration,
    /// Metrics endpoint address (`/metrics`, the status page).
    pub metrics: SocketAddr,
    /// Admin endpoint address (`/services`).
    pub admin: SocketAddr,
    /// Bearer token for the admin endpoint.
    pub admin_token: Option<String>,
    /// Capture service addresses on a dummy interface (as root).
    pub capture: bool,
    /// The dummy interface.
    pub interface: String,
    /// With capture, serve service addresses with transparent listeners at this port
    /// (`None`: a listener per frontend).
    pub transparent_port: Option<u16>,
    /// Where a new svcproxyd asks this one for its sockets, and this one asks a running one
    /// (`None`: no handover, a cold start).
    pub upgrade_socket: Option<PathBuf>,
    /// After handing over and draining, wait for SIGTERM instead of exiting.
    pub stay_after_handover: bool,
    /// Balance node-local clients at the socket (cgroup BPF).
    pub socket_lb: bool,
    /// Whose clients: this cgroup v2 directory (`None`: the cgroup v2 root, every process).
    pub socket_lb_cgroup: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            backend: BackendKind::Auto,
            proxy: ProxyConfig::default(),
            shutdown_grace: Duration::from_secs(5),
            node_name: None,
            node_addresses: vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)],
            node_zone: None,
            cluster_ranges: Vec::new(),
            health: DEFAULT_HEALTH,
            pending_timeout: Duration::from_secs(60),
            metrics: DEFAULT_METRICS,
            admin: DEFAULT_ADMIN,
            admin_token: None,
            capture: true,
            interface: "svcproxy0".into(),
            transparent_port: Some(DEFAULT_TRANSPARENT_PORT),
            upgrade_socket: None,
            stay_after_handover: false,
            socket_lb: false,
            socket_lb_cgroup: None,
        }
    }
}

/// What a config path holds: settings (TOML only) and services.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loaded {
    /// Settings; `None` for Kubernetes manifests (command-line options apply).
    pub settings: Option<Settings>,
    /// Every service, with its endpoints, each valid on its own.
    pub services: Vec<ServiceDoc>,
    /// Where each service is defined (`svcproxyd.toml: services[2] "default/web"`,
    /// `k8s/web.yaml: Service shop/web`), by name.
    pub origins: BTreeMap<String, String>,
    /// What was ignored and may be a mistake (kinds not read, unknown manifest fields).
    pub warnings: Vec<String>,
    /// When the newest change to each service's endpoints was triggered, as its
    /// EndpointSlices say (manifests only).
    pub triggered: BTreeMap<String, SystemTime>,
    /// Nodes among the manifests, by name.
    pub nodes: BTreeMap<String, Node>,
    /// Kubernetes objects left out, each with what is wrong with it, and manifest files kept
    /// as they were read before (they do not parse now): the rest is served.
    pub skipped: Vec<String>,
    /// How many objects were left out as not served here (SCTP, FQDN, other kinds).
    pub left_out: usize,
}

impl Loaded {
    /// The changes that publish every service with its endpoints.
    pub fn changes(&self) -> Vec<Change> {
        let mut changes = Vec::with_capacity(2 * self.services.len());
        // Each document was checked when it was loaded.
        for (service, endpoints) in self.services.iter().filter_map(|d| wanted(d).ok()) {
            let name = service.name.clone();
            changes.push(Change::Upsert(service));
            changes.push(Change::ReplaceEndpoints {
                service: name,
                endpoints,
            });
        }
        changes
    }
}

/// Why a config could not be used: every problem found, one per line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    fn at(path: &Path, problem: impl std::fmt::Display) -> Self {
        Self(format!("{}: {problem}", path.display()))
    }
}

/// The largest config or manifest file read (a 10,000-service cluster dump is ~30 MB).
pub const MAX_FILE_BYTES: u64 = 256 << 20;

/// Manifest files: YAML, and JSON (`kubectl get -o json`), which YAML reads too.
fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// The text of `path`, if it is no larger than [`MAX_FILE_BYTES`] and not empty: an editor
/// saving in place leaves a file empty for a moment, which must never read as "no services".
fn read(path: &Path) -> Result<String, ConfigError> {
    let file = std::fs::File::open(path).map_err(|e| ConfigError::at(path, e))?;
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| ConfigError::at(path, e))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        let problem = format!("larger than {MAX_FILE_BYTES} bytes, the most read");
        return Err(ConfigError::at(path, problem));
    }
    if text.trim().is_empty() {
        let problem = "the file is empty (write a comment to mean that it defines nothing)";
        return Err(ConfigError::at(path, problem));
    }
    Ok(text)
}

/// Reads `path` once (see [`Reader::load`]).
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    Reader::default().load(path)
}

/// Reads a config again and again, remembering each manifest file's text as last read whole,
/// so that a file that does not parse now (half written, or broken) counts as it was.
#[derive(Debug, Default)]
pub struct Reader {
    last_good: BTreeMap<PathBuf, String>,
}

impl Reader {
    /// Reads `path`: a TOML file, a manifest file, or a directory of manifests. Every service
    /// is checked on its own (conflicts between services are the table's to find).
    ///
    /// A problem of the TOML file or of a service it defines makes the whole load fail, the
    /// error listing every problem. Kubernetes objects are read as from a cluster: one that
    /// cannot be used is left out and named in [`Loaded::skipped`] (with the field as written
    /// there), and a manifest file that does not parse counts as it was last read.
    pub fn load(&mut self, path: &Path) -> Result<Loaded, ConfigError> {
        if path.is_dir() || is_manifest(path) {
            return checked(None, self.manifests(path)?, |_| true);
        }
        self.load_toml(path)
    }

    fn load_toml(&mut self, path: &Path) -> Result<Loaded, ConfigError> {
        let text = read(path)?;
        let file: ConfigFile =
            toml::from_str(&text).map_err(|e| ConfigError::at(path, e.to_string().trim_end()))?;
        let mut found = objects::Manifests::default();
        let mut errors = Vec::new();
        for (i, doc) in file.services.iter().enumerate() {
            let origin = format!("{}: services[{i}] {:?}", path.display(), clip(&doc.name));
            add(&mut found, doc.clone(), origin, &mut errors);
        }
        let mut from_manifests = BTreeSet::new();
        if let Some(dir) = &file.manifests {
            let dir = path.parent().unwrap_or(Path::new(".")).join(dir);
            match self.manifests(&dir) {
                Ok(mut more) => {
                    for doc in more.services {
                        let origin = more.origins.remove(&doc.name).unwrap_or_default();
                        from_manifests.insert(doc.name.clone());
                        add(&mut found, doc, origin, &mut errors);
                    }
                    found.warnings.extend(more.warnings);
                    found.triggered.extend(more.triggered);
                    found.nodes.extend(more.nodes);
                    found.errors.extend(more.errors);
                    found.left_out += more.left_out;
                }
                Err(e) => errors.push(e.0),
            }
        }
        let settings = match settings(&file, path) {
            Ok(s) => Some(s),
            Err(e) => {
                errors.insert(0, e.0);
                None
            }
        };
        match checked(settings, found, |name| from_manifests.contains(name)) {
            Ok(loaded) if errors.is_empty() => Ok(loaded),
            Ok(_) => Err(ConfigError(errors.join("\n"))),
            Err(e) => {
                errors.push(e.0);
                Err(ConfigError(errors.join("\n")))
            }
        }
    }
}

/// Adds `doc` (defined at `origin`) to `found`, or an error if a service of its name is there.
fn add(found: &mut objects::Manifests, doc: ServiceDoc, origin: String, errors: &mut Vec<String>) {
    match found.origins.get(&doc.name) {
        Some(first) => errors.push(format!(
            "{origin}: service {:?} is defined twice (first at {first})",
            clip(&doc.name)
        )),
        None => {
            found.origins.insert(doc.name.clone(), origin);
            found.services.push(doc);
        }
    }
}

/// `found` with every service checked: one read from a manifest (`from_manifest`) that the
/// table would refuse is left out, its error naming the manifest's field; one of the TOML
/// file makes it fail, with every such problem.
fn checked(
    settings: Option<Settings>,
    mut found: objects::Manifests,
    from_manifest: impl Fn(&str) -> bool,
) -> Result<Loaded, ConfigError> {
    let mut errors = Vec::new();
    let mut skipped: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
    found.services.retain(|doc| {
        let Err(e) = wanted(doc) else {
            return true;
        };
        let origin = found.origins.get(&doc.name).map_or("", String::as_str);
        if from_manifest(&doc.name) {
            let field = objects::manifest_field(doc, &e.field);
            skipped.push(format!("{origin}: {field}: {}", e.problem));
        } else {
            errors.push(format!("{origin}: {}: {}", e.field, e.problem));
        }
        false
    });
    if !errors.is_empty() {
        return Err(ConfigError(objects::lines(&errors, &found.warnings)));
    }
    let services: BTreeSet<&str> = found.services.iter().map(|d| d.name.as_str()).collect();
    found
        .origins
        .retain(|name, _| services.contains(name.as_str()));
    Ok(Loaded {
        settings,
        services: found.services,
        origins: found.origins,
        warnings: found.warnings,
        triggered: found.triggered,
        nodes: found.nodes,
        skipped,
        left_out: found.left_out,
    })
}

fn settings(file: &ConfigFile, path: &Path) -> Result<Settings, ConfigError> {
    let bad = |field: &str, why: String| ConfigError(format!("{}: {field}: {why}", path.display()));
    let p = &file.proxy;
    let backend = match p.backend.as_str() {
        "auto" => BackendKind::Auto,
        "epoll" => BackendKind::Epoll,
        "io_uring" => BackendKind::IoUring,
        other => {
            return Err(bad(
                "proxy.backend",
                format!("{other:?} is not auto, epoll or io_uring"),
            ));
        }
    };
    let duration = |field: &str, got: Duration, range: RangeInclusive<Duration>| {
        check_duration(&format!("proxy.{field}"), got, range)
            .map(|()| got)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    };
    let mut proxy = ProxyConfig {
        workers: p.workers,
        max_connections: p.max_connections,
        max_connections_per_client: p.max_connections_per_client,
        max_udp_flows: p.max_udp_flows,
        max_udp_flows_per_client: p.max_udp_flows_per_client,
        udp_idle_timeout: duration(
            "udp_idle_timeout_s",
            Duration::from_secs(p.udp_idle_timeout_s),
            UDP_IDLE_TIMEOUT_RANGE,
        )?,
        ..ProxyConfig::default()
    };
    proxy.tcp.connect_timeout = duration(
        "connect_timeout_ms",
        Duration::from_millis(p.connect_timeout_ms),
        CONNECT_TIMEOUT_RANGE,
    )?;
    proxy.tcp.connect_attempts = p.connect_attempts;
    proxy.tcp.idle_timeout = match p.idle_timeout_s {
        0 => None,
        s => Some(duration(
            "idle_timeout_s",
            Duration::from_secs(s),
            IDLE_TIMEOUT_RANGE,
        )?),
    };
    proxy.tcp.drain = match p.drain_close_after_s {
        0 => DrainPolicy::Keep,
        s => DrainPolicy::CloseAfter(duration(
            "drain_close_after_s",
            Duration::from_secs(s),
            DRAIN_RANGE,
        )?),
    };
    let shutdown_grace = duration(
        "shutdown_grace_s",
        Duration::from_secs(p.shutdown_grace_s),
        SHUTDOWN_GRACE_RANGE,
    )?;
    proxy.io_uring.forwarding = match p.forwarding.as_str() {
        "buffers" => Forwarding::Buffers,
        "splice" => Forwarding::Splice,
        other => {
            return Err(bad(
                "proxy.forwarding",
                format!("{other:?} is not buffers or splice"),
            ));
        }
    };
    proxy.preserve_client_ip = file.capture.preserve_client_ip;
    proxy.validate().map_err(|e| bad("proxy", e))?;
    let admin_token = match (&file.admin.token, &file.admin.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(f)) => {
            let f = path.parent().unwrap_or(Path::new(".")).join(f);
            let t = std::fs::read_to_string(&f)
                .map_err(|e| bad("admin.token_file", format!("{}: {e}", f.display())))?;
            Some(t.trim().to_string())
        }
        (None, None) => None,
    };
    let transparent_port = parse_listeners(&file.capture.listeners, file.capture.transparent_port)
        .map_err(|e| bad("capture.listeners", e))?;
    let pending_timeout = Duration::from_secs(file.health.pending_timeout_s);
    check_duration(
        "health.pending_timeout_s",
        pending_timeout,
        PENDING_TIMEOUT_RANGE,
    )
    .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
    Ok(Settings {
        backend,
        proxy,
        shutdown_grace,
        node_name: file.node.name.clone(),
        node_addresses: file
            .node
            .addresses
            .clone()
            .unwrap_or_else(|| Settings::default().node_addresses),
        node_zone: file.node.zone.clone(),
        cluster_ranges: file.node.cluster_cidrs.clone(),
        health: file.health.listen,
        pending_timeout,
        metrics: file.metrics.listen,
        admin: file.admin.listen.unwrap_or(DEFAULT_ADMIN),
        admin_token,
        capture: file.capture.cluster_ips,
        interface: file.capture.interface.clone(),
        transparent_port,
        upgrade_socket: file
            .upgrade
            .socket
            .as_ref()
            .map(|f| path.parent().unwrap_or(Path::new(".")).join(f)),
        stay_after_handover: file.upgrade.stay_after_handover,
        socket_lb: file.socket_lb.enabled,
        socket_lb_cgroup: file.socket_lb.cgroup.clone(),
    })
}

impl Reader {
    /// The manifest files of `path` (a file, or every `.yaml`, `.yml` and `.json` file of a
    /// directory, in name order), mapped to services. A file that cannot be read, or does not
    /// parse, counts as it was last read whole (and is reported in [`Manifests::errors`]).
    ///
    /// [`Manifests::errors`]: objects::Manifests::errors
    fn manifests(&mut self, path: &Path) -> Result<objects::Manifests, ConfigError> {
        let files: Vec<PathBuf> = if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| ConfigError::at(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_manifest(p))
                .collect();
            files.sort();
            files
        } else {
            vec![path.to_path_buf()]
        };
        let mut texts = Vec::new();
        let mut unread = Vec::new();
        for f in &files {
            match read(f) {
                Ok(text) => texts.push((f.display().to_string(), text)),
                Err(e) => unread.push((f, e)),
            }
        }
        let found = objects::services(&texts);
        // Files read whole this time are what later ones fall back on.
        for (name, text) in &texts {
            if !found.unparsed.contains_key(name) {
                self.last_good.insert(PathBuf::from(name), text.clone());
            }
        }
        self.last_good.retain(|f, _| files.contains(f));
        let mut problems: Vec<(String, objects::ManifestError)> = unread
            .into_iter()
            .map(|(f, e)| {
                let file = f.display().to_string();
                let problem = e.0.strip_prefix(&format!("{file}: ")).unwrap_or(&e.0);
                let error = objects::ManifestError {
                    object: file.clone(),
                    problem: problem.to_string(),
                };
                (file, error)
            })
            .collect();
        problems.extend(found.unparsed.clone());
        let kept: Vec<(String, String)> = problems
            .iter()
            .filter_map(|(f, _)| Some((f.clone(), self.last_good.get(Path::new(f))?.clone())))
            .collect();
        let mut found = if kept.is_empty() {
            found
        } else {
            let whole: Vec<(String, String)> = texts
                .into_iter()
                .filter(|(f, _)| !found.unparsed.contains_key(f))
                .chain(kept.iter().cloned())
                .collect();
            objects::services(&whole)
        };
        found.errors.extend(problems.into_iter().map(|(_, e)| e));
        found
            .errors
            .extend(kept.into_iter().map(|(file, _)| objects::ManifestError {
                object: file,
                problem: "served as it was last read whole".into(),
            }));
        Ok(found)
    }
}

/// What a reload looks at to notice a change: every file's path, size and modification time.
pub fn signature(path: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut paths = vec![path.to_path_buf()];
    if path.is_dir() {
        if let Ok(dir) = std::fs::read_dir(path) {
            paths.extend(dir.filter_map(|e| e.ok().map(|e| e.path())));
        }
    } else if !is_manifest(path)
        && let Ok(text) = read(path)
        && let Ok(file) = toml::from_str::<ConfigFile>(&text)
        && let Some(dir) = file.manifests
    {
        return signature(&path.parent().unwrap_or(Path::new(".")).join(dir))
            .into_iter()
            .chain(signature_of(path))
            .collect();
    }
    paths.sort();
    paths.iter().flat_map(|p| signature_of(p)).collect()
}

fn signature_of(path: &Path) -> Option<(PathBuf, u64, Option<SystemTime>)> {
    let m = std::fs::metadata(path).ok()?;
    Some((path.to_path_buf(), m.len(), m.modified().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("svcproxyd-config-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_full_toml_config_is_read() {
        let path = write(
            "full.toml",
            r#"
[proxy]
backend = "epoll"
workers = 2
connect_timeout_ms = 250
idle_timeout_s = 0
max_udp_flows_per_client = 7
drain_close_after_s = 30
forwarding = "splice"

[node]
name = "node-a"
addresses = ["198.18.2.1"]

[health]
listen = "127.0.0.1:9997"
pending_timeout_s = 5

[metrics]
listen = "127.0.0.1:9998"

[admin]
listen = "127.0.0.1:9999"
token = "secret"

[capture]
cluster_ips = false
preserve_client_ip = true
listeners = "per-frontend"

[socket_lb]
enabled = true
cgroup = "/sys/fs/cgroup/kubepods.slice"

[[services]]
name = "default/web"
addresses = ["198.18.0.10"]
ports = [{ name = "http", port = 80, target_port = 8080 }, { name = "dns", port = 53, protocol = "UDP" }]
policy = "maglev"
session_affinity = "client_ip"
endpoints = [{ address = "198.19.1.5" }, { address = "198.19.2.7:8080", weight = 3, node = "node-a" }]
"#,
        );
        let loaded = load(&path).unwrap();
        let s = loaded.settings.unwrap();
        assert_eq!(s.backend, BackendKind::Epoll);
        assert_eq!(s.proxy.workers, 2);
        assert_eq!(s.proxy.tcp.connect_timeout, Duration::from_millis(250));
        assert_eq!(s.proxy.tcp.idle_timeout, None);
        assert_eq!(s.proxy.udp_flows_per_client(), 7);
        assert_eq!(
            s.proxy.tcp.drain,
            DrainPolicy::CloseAfter(Duration::from_secs(30))
        );
        assert_eq!(s.proxy.io_uring.forwarding, Forwarding::Splice);
        assert!(s.proxy.preserve_client_ip && !s.capture);
        assert_eq!(s.transparent_port, None);
        assert_eq!(s.node_name.as_deref(), Some("node-a"));
        assert_eq!(s.admin, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(s.health, "127.0.0.1:9997".parse().unwrap());
        assert_eq!(s.metrics, "127.0.0.1:9998".parse().unwrap());
        assert_eq!(s.pending_timeout, Duration::from_secs(5));
        assert_eq!(s.admin_token.as_deref(), Some("secret"));
        assert!(s.socket_lb);
        assert_eq!(
            s.socket_lb_cgroup.as_deref(),
            Some(Path::new("/sys/fs/cgroup/kubepods.slice"))
        );
        assert_eq!(loaded.services.len(), 1);
        let (service, endpoints) = loaded.services[0].to_model().unwrap();
        assert_eq!(service.policy, svcproxy::Policy::maglev());
        assert_eq!(endpoints.unwrap()[1].weight, 3);
    }

    #[test]
    fn bad_configs_name_the_file_and_field() {
        let err = |name: &str, text: &str| load(&write(name, text)).unwrap_err().to_string();
        let e = err("typo.toml", "[proxy]\nworkerz = 2\n");
        assert!(
            e.contains("typo.toml") && e.contains("unknown field `workerz`"),
            "{e}"
        );
        let e = err("backend.toml", "[proxy]\nbackend = \"dpdk\"\n");
        assert!(
            e.ends_with("proxy.backend: \"dpdk\" is not auto, epoll or io_uring"),
            "{e}"
        );
        let e = err("range.toml", "[proxy]\nconnect_attempts = 0\n");
        assert!(e.contains("proxy: tcp.connect_attempts is 0"), "{e}");
        // Every duration has a range, checked before anything adds it to a clock.
        for (field, range) in [
            ("drain_close_after_s", "between 0ns and 86400s"),
            ("shutdown_grace_s", "between 0ns and 3600s"),
            ("idle_timeout_s", "between 1ms and 31536000s"),
            ("udp_idle_timeout_s", "between 1ms and 86400s"),
            ("connect_timeout_ms", "between 1ms and 600s"),
        ] {
            // TOML integers are i64: the largest one.
            let e = err("huge.toml", &format!("[proxy]\n{field} = {}\n", i64::MAX));
            assert!(
                e.contains(&format!("huge.toml: proxy.{field} is ")) && e.ends_with(range),
                "{e}"
            );
        }
        let e = err("listeners.toml", "[capture]\nlisteners = \"ebpf\"\n");
        assert!(
            e.ends_with("capture.listeners: \"ebpf\" is not transparent or per-frontend"),
            "{e}"
        );
        let e = err("tport.toml", "[capture]\ntransparent_port = 0\n");
        assert!(
            e.ends_with("capture.listeners: transparent_port is 0"),
            "{e}"
        );
        let e = err("pending.toml", "[health]\npending_timeout_s = 0\n");
        assert!(
            e.ends_with("health.pending_timeout_s is 0ns, must be between 1s and 3600s"),
            "{e}"
        );
        let e = err("zero.toml", "[proxy]\nudp_idle_timeout_s = 0\n");
        assert!(
            e.ends_with("proxy.udp_idle_timeout_s is 0ns, must be between 1ms and 86400s"),
            "{e}"
        );
        let e = err("syntax.toml", "[[services]\nname = 1\n");
        assert!(e.contains("syntax.toml"), "{e}");
        let e = err(
            "svc.toml",
            "[[services]]\nname = \"x\"\nports = [{ port = \"http\" }]\n",
        );
        assert!(e.contains("svc.toml") && e.contains("port"), "{e}");
    }

    #[test]
    fn a_directory_of_manifests_is_read_in_name_order_and_signed() {
        let dir = std::env::temp_dir().join(format!("svcproxyd-manifests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("a.yaml"),
            "kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 198.18.0.1, ports: [{port: 80}]}\n",
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), "not yaml").unwrap();
        let before = signature(&dir);
        let loaded = load(&dir).unwrap();
        assert!(loaded.settings.is_none());
        assert_eq!(loaded.services[0].name, "default/a");
        std::fs::write(
            dir.join("b.yml"),
            "kind: Service\nmetadata: {name: b}\nspec: {clusterIP: 198.18.0.2, ports: [{port: 80}]}\n",
        )
        .unwrap();
        assert_ne!(signature(&dir), before, "a new file changes the signature");
        assert_eq!(load(&dir).unwrap().services.len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A directory of its own holding `files`.
    fn dir(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("svcproxyd-dir-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, text) in files {
            std::fs::write(dir.join(file), text).unwrap();
        }
        dir
    }

    /// What a directory of its own holding `files` loads to; the directory is removed first.
    fn load_dir(name: &str, files: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
        let d = dir(name, files);
        let loaded = load(&d);
        std::fs::remove_dir_all(&d).unwrap();
        loaded
    }

    const WEB: &str = "kind: Service\nmetadata: {name: web}\nspec: {clusterIP: 198.18.0.1, ports: [{port: 80}]}\n";

    #[test]
    fn every_bad_service_is_reported_with_its_file_entry_and_field() {
        let path = write(
            "many.toml",
            "[[services]]\nname = \"a\"\nports = [{ port = 0 }]\n\n\
             [[services]]\nname = \"b\"\naddresses = [\"198.18.0.1\"]\nports = [{ port = 80 }]\nendpoints = [{ address = \"198.19.0.1\" }]\n\n\
             [[services]]\nname = \"c\"\naddresses = [\"198.18.0.2\"]\nports = [{ port = 80 }]\nsession_affinity = \"client_ip\"\naffinity_timeout_seconds = 18446744073709551615\n",
        );
        let e = load(&path).unwrap_err().to_string();
        let lines: Vec<&str> = e.lines().collect();
        let at = |i: usize, name: &str| format!("{}: services[{i}] \"{name}\": ", path.display());
        assert_eq!(lines.len(), 3, "{e}");
        assert_eq!(
            lines[0],
            format!("{}ports[0].port: must not be 0", at(0, "a"))
        );
        assert!(
            lines[1].starts_with(&format!(
                "{}endpoints[0]: no port of the service",
                at(1, "b")
            )),
            "an endpoint without a port is refused: {e}"
        );
        assert_eq!(
            lines[2],
            format!(
                "{}affinity_timeout_seconds: is 18446744073709551615, must be between 1 and 86400",
                at(2, "c")
            )
        );
    }

    #[test]
    fn duplicates_are_errors_naming_both_places() {
        let path = write(
            "twice.toml",
            "[[services]]\nname = \"web\"\naddresses = [\"198.18.0.1\"]\nports = [{ port = 80 }]\n\n\
             [[services]]\nname = \"web\"\naddresses = [\"198.18.0.2\"]\nports = [{ port = 80 }]\n",
        );
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.contains("services[1] \"web\": service \"web\" is defined twice (first at")
                && e.contains("services[0]"),
            "{e}"
        );
        let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [198.19.0.1]}]\n";
        let loaded = load_dir(
            "dups",
            &[
                ("a.yaml", WEB),
                ("b.yaml", WEB),
                ("c.yaml", slice),
                ("d.yml", slice),
            ],
        )
        .unwrap();
        assert!(
            loaded.origins["default/web"].contains("a.yaml"),
            "{loaded:?}"
        );
        let e = loaded.skipped.join("\n");
        assert!(
            e.contains("b.yaml: Service default/web: defined twice (first at ")
                && e.contains("a.yaml: Service default/web)"),
            "{e}"
        );
        assert!(
            e.contains("d.yml: EndpointSlice default/web-1: defined twice"),
            "{e}"
        );
    }

    #[test]
    fn unknown_kinds_and_fields_are_warnings_with_a_hint() {
        let typo = "kind: Servce\nmetadata: {name: x}\n---\n\
                    kind: Service\nmetadata: {name: web}\nspec: {clusterIP: 198.18.0.1, clusterIp: 198.18.0.2, ports: [{port: 80, nodeport: 30001}]}\n";
        let w = load_dir("warn", &[("a.yaml", typo)])
            .unwrap()
            .warnings
            .join("\n");
        assert!(
            w.contains("document 1: kind \"Servce\" is not read (did you mean Service?)"),
            "{w}"
        );
        assert!(
            w.contains("Service default/web: unknown field spec.clusterIp (did you mean clusterIP?), ignored"),
            "{w}"
        );
        assert!(
            w.contains("unknown field spec.ports[0].nodeport (did you mean nodePort?)"),
            "{w}"
        );
        let w = load_dir(
            "case",
            &[("a.yaml", "kind: service\nmetadata: {name: x}\n")],
        )
        .unwrap()
        .warnings
        .join("\n");
        assert!(
            w.contains("kind \"service\" is not read (did you mean Service?)"),
            "{w}"
        );
    }

    #[test]
    fn manifest_mistakes_name_the_manifest_field() {
        let wrong_family = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\n\
                            addressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: ['::1']}]\n";
        let loaded = load_dir("family", &[("a.yaml", WEB), ("b.yaml", wrong_family)]).unwrap();
        assert_eq!(
            loaded.services.len(),
            1,
            "the service is served without the slice"
        );
        let e = loaded.skipped.join("\n");
        assert!(
            e.ends_with("b.yaml: EndpointSlice default/web-1: endpoints[0].addresses[0]: ::1 is not an address of the slice's addressType IPv4"),
            "{e}"
        );
        let bad_port = "kind: Service\nmetadata: {name: web}\nspec: {clusterIP: 198.18.0.1, ports: [{port: 80, nodePort: 0}]}\n";
        let loaded = load_dir("port", &[("a.yaml", bad_port)]).unwrap();
        assert!(loaded.services.is_empty(), "{loaded:?}");
        let e = loaded.skipped.join("\n");
        assert!(
            e.ends_with("a.yaml: Service default/web: spec.ports[0].nodePort: must not be 0"),
            "{e}"
        );
    }

    #[test]
    fn json_manifests_are_read_and_an_empty_file_keeps_what_it_held() {
        let json = r#"{"kind": "Service", "metadata": {"name": "api"}, "spec": {"clusterIP": "198.18.0.9", "ports": [{"port": 443}]}}"#;
        let d = dir("json", &[("a.yaml", WEB), ("b.json", json)]);
        let mut reader = Reader::default();
        let names = |loaded: Loaded| -> Vec<String> {
            loaded.services.into_iter().map(|s| s.name).collect()
        };
        assert_eq!(
            names(reader.load(&d).unwrap()),
            ["default/api", "default/web"]
        );
        std::fs::write(d.join("a.yaml"), "").unwrap();
        let loaded = reader.load(&d).unwrap();
        let e = loaded.skipped.join("\n");
        assert!(
            e.contains(
                "a.yaml: the file is empty (write a comment to mean that it defines nothing)"
            ) && e.contains("served as it was last read whole"),
            "{e}"
        );
        assert_eq!(
            names(loaded),
            ["default/api", "default/web"],
            "a.yaml as last read"
        );
        let e = load(&d).unwrap().skipped.join("\n");
        assert!(
            e.ends_with(
                "a.yaml: the file is empty (write a comment to mean that it defines nothing)"
            ),
            "never read whole, it gives nothing: {e}"
        );
        std::fs::write(d.join("a.yaml"), "# nothing here yet\n").unwrap();
        assert_eq!(
            names(reader.load(&d).unwrap()),
            ["default/api"],
            "a comment means: no services"
        );
        let e = load(&write("empty.toml", " \n")).unwrap_err().to_string();
        assert!(
            e.ends_with(
                "empty.toml: the file is empty (write a comment to mean that it defines nothing)"
            ),
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn long_values_are_clipped_in_messages() {
        let long = "n".repeat(100_000);
        let path = write(
            "long.toml",
            &format!(
                "[[services]]\nname = \"{long}\"\naddresses = [\"198.18.0.1\"]\nports = [{{ port = 80 }}]\n"
            ),
        );
        let e = load(&path).unwrap_err().to_string();
        assert!(e.len() < 400, "{} bytes: {}", e.len(), &e[..400]);
        assert!(
            e.contains("... (100000 bytes)") && e.contains("name: is 100000 bytes long"),
            "{e}"
        );
    }
}
