//! A running daemon: the table, the proxy, what the config file owns, the capture, and the
//! handlers of its three HTTP endpoints: health ([`Daemon::health`], read-only, as
//! kube-proxy's), metrics ([`Daemon::metrics`], read-only) and the writable admin API
//! ([`Daemon::admin`], behind a token when one is set). Every change (reload, admin call) goes
//! through [`Daemon::apply`]: validated and published as one generation, or rejected with the
//! running table unchanged.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use svcproxy::core::error::clip;
use svcproxy::core::{Batch, Change};
use svcproxy::{Proxy, Table, TableError};
use svcproxy_core::schema::{ServiceDoc, TableDoc};
use tracing::{error, info, warn};

use crate::capture::{Capture, CaptureState};
use crate::config::Loaded;
use crate::health_check::HealthChecks;
use crate::http::{Request, Response};
use crate::metrics::{self, Changes, SyncMetrics};
use crate::publish::{Publisher, Wanted};
use crate::status;

pub struct Daemon {
    pub table: Arc<Table>,
    pub proxy: Proxy,
    /// Services a source (the config files, the Kubernetes API) defines, with where: the
    /// source removes those it no longer has; the admin API may not change them; services it
    /// added are left alone.
    owned: Mutex<BTreeMap<String, (Source, String)>>,
    /// Turns what the sources want into the smallest batch, settling conflicts.
    publisher: Mutex<Publisher>,
    /// What each source left out (objects it could not use), and how many objects it left out
    /// as not served here; with the lines already logged, so each is logged once.
    skipped: Mutex<BTreeMap<Source, Skipped>>,
    capture: Mutex<Option<Capture>>,
    /// The health check node ports, once served ([`Daemon::serve_health_checks`]).
    health_checks: Mutex<Option<HealthChecks>>,
    /// Without capture: the service addresses checked for an interface that has them.
    checked: Mutex<BTreeSet<IpAddr>>,
    publish_ns: AtomicU64,
    /// Reloads attempted, and the error of the last one if it was rejected.
    reloads: AtomicU64,
    reload_error: Mutex<Option<String>>,
    pub stopping: AtomicBool,
    /// The pid of the svcproxyd this one handed over to (0: none).
    pub handed_to: AtomicU32,
    token: Option<String>,
    /// Generations published and not yet known applied by every worker, oldest first (at
    /// most [`UNAPPLIED_KEPT`]).
    unapplied: Mutex<VecDeque<Unapplied>>,
    /// kube-proxy's sync series.
    sync: SyncMetrics,
    /// Whether this node may take load-balancer traffic, when a Node object among the
    /// manifests says (false: it is being removed).
    node_eligible: Mutex<Option<bool>>,
    /// How long a change may wait for the data path before `/healthz` says 503.
    pending_timeout: Duration,
    /// How the Kubernetes API's watches stand, when it is a source.
    api: Mutex<Option<Arc<Mutex<crate::watch::Status>>>>,
    /// Why socket-level load balancing, asked for, is not attached.
    socket_lb_error: Mutex<Option<String>>,
}

/// A generation published and not yet known applied by every worker.
#[derive(Debug, Clone, Copy)]
struct Unapplied {
    generation: u64,
    /// When it was published.
    published: SystemTime,
    /// What it changed.
    changes: Changes,
    /// When the first Kubernetes API event it carries arrived, if it carries any.
    event: Option<SystemTime>,
}

/// Where services come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// The config path: a TOML file, manifests.
    Files,
    /// The Kubernetes API.
    Api,
}

impl Source {
    /// Its name in metrics and `/healthz`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Files => "files",
            Self::Api => "api",
        }
    }
}

/// What a source left out.
#[derive(Debug, Default)]
struct Skipped {
    /// The objects it could not use, each with why.
    invalid: Vec<String>,
    /// How many objects it does not serve (SCTP, FQDN, other kinds).
    left_out: usize,
    /// The lines logged.
    logged: BTreeSet<String>,
}

/// Unapplied generations remembered; past it the newest entry is replaced, so that the oldest
/// (what the health check measures) stays.
const UNAPPLIED_KEPT: usize = 1024;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Daemon {
    pub fn new(
        table: Arc<Table>,
        proxy: Proxy,
        capture: Option<Capture>,
        token: Option<String>,
        pending_timeout: Duration,
    ) -> Self {
        Self {
            table,
            proxy,
            owned: Mutex::new(BTreeMap::new()),
            publisher: Mutex::new(Publisher::default()),
            skipped: Mutex::new(BTreeMap::new()),
            capture: Mutex::new(capture),
            health_checks: Mutex::new(None),
            checked: Mutex::new(BTreeSet::new()),
            publish_ns: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            reload_error: Mutex::new(None),
            stopping: AtomicBool::new(false),
            handed_to: AtomicU32::new(0),
            token,
            unapplied: Mutex::new(VecDeque::new()),
            sync: SyncMetrics::default(),
            node_eligible: Mutex::new(None),
            pending_timeout,
            api: Mutex::new(None),
            socket_lb_error: Mutex::new(None),
        }
    }

    /// Socket-level load balancing was asked for and could not be attached, for `reason`.
    pub fn socket_lb_failed(&self, reason: String) {
        *lock(&self.socket_lb_error) = Some(reason);
    }

    /// Publishes `batch`, then brings the captured addresses in line with the table.
    pub fn apply(&self, batch: Batch) -> Result<u64, TableError> {
        self.apply_events(batch, None)
    }

    /// [`Daemon::apply`] for Kubernetes API events, the first of which arrived at `event`.
    fn apply_events(&self, batch: Batch, event: Option<SystemTime>) -> Result<u64, TableError> {
        let mut changes = Changes::default();
        for change in batch.changes() {
            match change {
                Change::Upsert(_) | Change::Remove(_) => changes.services += 1,
                Change::ReplaceEndpoints { .. } => changes.endpoints += 1,
            }
        }
        let published = self.table.apply(batch)?;
        let now = SystemTime::now();
        self.publish_ns
            .store(published.elapsed.as_nanos() as u64, Ordering::Relaxed);
        self.sync.published(published.elapsed, now, changes);
        let mut unapplied = lock(&self.unapplied);
        let mut event = event;
        if unapplied.len() == UNAPPLIED_KEPT
            && let Some(newest) = unapplied.pop_back()
        {
            changes += newest.changes;
            event = newest.event.or(event);
        }
        unapplied.push_back(Unapplied {
            generation: published.generation,
            published: now,
            changes,
            event,
        });
        drop(unapplied);
        self.sync_capture();
        if let Some(checks) = lock(&self.health_checks).as_mut() {
            checks.sync(&self.table.load());
        }
        Ok(published.generation)
    }

    /// What the capture holds, for a handover to another svcproxyd.
    pub fn capture_state(&self) -> Option<CaptureState> {
        lock(&self.capture).as_ref().map(Capture::state)
    }

    /// The svcproxyd this one took over from has retired: the capture is this one's.
    pub fn own_capture(&self) {
        if let Some(capture) = lock(&self.capture).as_mut() {
            capture.own();
        }
    }

    /// Duplicates of the health check node ports' listening sockets, to hand over.
    pub fn health_check_listeners(&self) -> Vec<std::net::TcpListener> {
        lock(&self.health_checks)
            .as_ref()
            .map(HealthChecks::listeners)
            .unwrap_or_default()
    }

    /// Another svcproxyd (`pid`) serves from now on: the capture stays in place when this one
    /// exits, the health check node ports are its, and `/healthz` says this one drains.
    pub fn handed_over(&self, pid: u32) {
        self.handed_to.store(pid, Ordering::SeqCst);
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(capture) = lock(&self.capture).take() {
            capture.hand_over();
        }
        lock(&self.health_checks).take();
    }

    /// Serves the services' health check node ports with `checks`, from now on.
    pub fn serve_health_checks(&self, mut checks: HealthChecks) {
        checks.sync(&self.table.load());
        *lock(&self.health_checks) = Some(checks);
    }

    /// Captures every service address of the table (and steers its frontends to the
    /// transparent listeners, when they are used); without capture,
    /// warns (once per address) about those no interface of this host has: listeners bind
    /// them, and nothing reaches them.
    pub fn sync_capture(&self) {
        let snapshot = self.table.load();
        let wanted: BTreeSet<IpAddr> = snapshot
            .services()
            .flat_map(|s| s.spec().frontend_addresses())
            .collect();
        if let Some(capture) = lock(&self.capture).as_mut() {
            capture.sync(wanted, snapshot.steered_frontends());
            return;
        }
        let mut checked = lock(&self.checked);
        let new: BTreeSet<IpAddr> = wanted.difference(&checked).copied().collect();
        for ip in unreachable(&new) {
            warn!(
                address = %ip,
                "no interface here has this service address and capture is off: nothing reaches it (assign it, or run as root without --no-capture)"
            );
        }
        *checked = wanted;
    }

    /// Makes the table hold what `loaded` describes: its services (with their endpoints), and
    /// none of the files' services it no longer has; only what changed is published. One
    /// generation, or nothing (a conflict among Kubernetes objects is settled, see
    /// [`crate::publish`]; one involving the TOML file's services fails it).
    pub fn load(&self, loaded: &Loaded) -> Result<u64, String> {
        let mut wanted: BTreeMap<String, Option<Wanted>> = lock(&self.owned)
            .iter()
            .filter(|(name, (source, _))| {
                *source == Source::Files && !loaded.origins.contains_key(*name)
            })
            .map(|(name, _)| (name.clone(), None))
            .collect();
        for doc in &loaded.services {
            // Each document was checked when it was loaded.
            if let Ok(w) = crate::publish::wanted(doc) {
                wanted.insert(doc.name.clone(), Some(w));
            }
        }
        let settle = loaded.settings.is_none();
        let generation = self
            .publish(
                Source::Files,
                wanted,
                settle,
                &loaded.origins,
                &loaded.triggered,
                None,
            )
            .map_err(|e| explain(&e, loaded))?;
        // With the API watched, this node's Node comes from there.
        if lock(&self.api).is_none() {
            let node = self.table.config().node_name.as_deref();
            self.set_node(node.and_then(|n| loaded.nodes.get(n)));
        }
        self.report(
            Source::Files,
            &loaded.warnings,
            loaded.skipped.clone(),
            loaded.left_out,
        );
        Ok(generation)
    }

    /// Publishes what `source` wants of each service `wanted` names (`None`: gone), with
    /// where each is defined (`origins`) and when its endpoints' change was triggered
    /// (`triggered`), settling conflicts or not. Services it refuses are reported as skipped.
    pub fn publish(
        &self,
        source: Source,
        wanted: BTreeMap<String, Option<Wanted>>,
        settle: bool,
        origins: &BTreeMap<String, String>,
        triggered: &BTreeMap<String, SystemTime>,
        event: Option<SystemTime>,
    ) -> Result<u64, TableError> {
        let mut owned = lock(&self.owned);
        let names: Vec<(String, bool)> = wanted
            .iter()
            .map(|(n, w)| (n.clone(), w.is_some()))
            .collect();
        let mut publisher = lock(&self.publisher);
        let apply = |batch| self.apply_events(batch, event);
        let outcome = publisher.publish(&self.table, wanted, settle, apply)?;
        for (service, losses) in publisher.contested() {
            for (key, holder) in losses {
                let line = format!(
                    "service {service:?}: {key} is served for {holder:?} (the first name), not for it"
                );
                self.report_once(source, line);
            }
        }
        drop(publisher);
        let now = SystemTime::now();
        for name in &outcome.endpoints_changed {
            if let Some(&t) = triggered.get(name) {
                self.sync.programmed(t, now);
            }
        }
        for (name, present) in names {
            if present {
                let origin = origins.get(&name).cloned().unwrap_or_default();
                owned.insert(name, (source, origin));
            } else if owned.get(&name).is_some_and(|(s, _)| *s == source) {
                owned.remove(&name);
            }
        }
        for why in outcome.refused {
            warn!("{why}; it stays as it was");
        }
        Ok(outcome.generation)
    }

    /// Shows how the Kubernetes API's watches stand in `/healthz`.
    pub fn watching(&self, status: Arc<Mutex<crate::watch::Status>>) {
        *lock(&self.api) = Some(status);
    }

    /// Publishes an update from the Kubernetes API (conflicts settled), and records how long
    /// it took from its first event to the table.
    pub fn api_update(&self, update: crate::watch::Update) -> Result<u64, TableError> {
        let event = update.received.map(|r| SystemTime::now() - r.elapsed());
        let generation = self.publish(
            Source::Api,
            update.wanted,
            true,
            &update.origins,
            &update.triggered,
            event,
        )?;
        if let Some(received) = update.received {
            self.sync.api_published(received.elapsed());
        }
        if self.table.config().node_name.is_some() {
            self.set_node(update.node.as_ref());
        }
        self.report(
            Source::Api,
            &update.warnings,
            update.skipped,
            update.left_out,
        );
        Ok(generation)
    }

    /// Forgets the generations every worker has applied since the last look, recording for
    /// those carrying API events how long they took from the first event to the workers.
    pub fn observe_applied(&self) {
        self.unapplied();
    }

    /// Whether this node may take load-balancer traffic, as its Node object says (`None`:
    /// no object).
    pub fn set_node(&self, node: Option<&crate::objects::Node>) {
        *lock(&self.node_eligible) = node.map(|n| n.eligible);
    }

    /// Records what `source` left out now (`skipped`: objects it could not use; `left_out`: how
    /// many it does not serve) and its `warnings`, logging each line not logged before.
    pub fn report(
        &self,
        source: Source,
        warnings: &[String],
        skipped: Vec<String>,
        left_out: usize,
    ) {
        let mut all = lock(&self.skipped);
        let entry = all.entry(source).or_default();
        let mut logged = BTreeSet::new();
        for w in warnings {
            if !entry.logged.contains(w) {
                warn!("{w}");
            }
            logged.insert(w.clone());
        }
        for e in &skipped {
            if !entry.logged.contains(e) {
                error!("{e}; left out, the rest is served");
            }
            logged.insert(e.clone());
        }
        entry.logged = logged;
        self.sync.skipped(source.name(), skipped.len(), left_out);
        entry.invalid = skipped;
        entry.left_out = left_out;
    }

    /// Logs `line` for `source` unless it was logged since its last [`Daemon::report`].
    fn report_once(&self, source: Source, line: String) {
        let mut all = lock(&self.skipped);
        if all.entry(source).or_default().logged.insert(line.clone()) {
            warn!("{line}");
        }
    }

    /// Objects left out, by source: those that could not be used, and those not served here.
    pub fn skipped(&self) -> BTreeMap<Source, (Vec<String>, usize)> {
        lock(&self.skipped)
            .iter()
            .map(|(s, k)| (*s, (k.invalid.clone(), k.left_out)))
            .collect()
    }

    /// The health endpoint: `/healthz` (kube-proxy's JSON and more; 503 when unhealthy) and
    /// `/livez` (200 while the proxy serves: 503 only once a worker is down).
    pub fn health(&self, r: &Request) -> Response {
        match (r.method.as_str(), r.path.as_str()) {
            ("GET", "/healthz") => self.healthz(),
            ("GET", "/livez") => match self.proxy.down() {
                Some(down) => Response::error(503, down),
                None => Response::json(200, &serde_json::json!({ "live": true })),
            },
            (_, "/healthz" | "/livez") => Response::error(405, "use GET"),
            _ => Response::error(404, "unknown path (try /healthz, /livez)"),
        }
    }

    /// The metrics endpoint: `/metrics`, and the status page (`/`, reading `/status.json`).
    pub fn metrics(&self, r: &Request) -> Response {
        match (r.method.as_str(), r.path.as_str()) {
            ("GET", "/metrics") => {
                let seconds = self.publish_ns.load(Ordering::Relaxed) as f64 / 1e9;
                let (_, pending) = self.unapplied();
                let text = metrics::render(
                    &self.table.load(),
                    self.table.config().node_name.as_deref(),
                    seconds,
                    &self.proxy,
                    &self.sync,
                    pending,
                );
                Response::text(200, metrics::CONTENT_TYPE, text)
            }
            ("GET", "/") => Response::text(200, "text/html; charset=utf-8", status::PAGE.into()),
            ("GET", "/status.json") => Response::json(
                200,
                &status::json(
                    &self.table.load(),
                    &self.proxy,
                    self.reloads.load(Ordering::SeqCst),
                    lock(&self.reload_error).as_deref(),
                ),
            ),
            (_, "/" | "/metrics" | "/status.json") => Response::error(405, "use GET"),
            _ => Response::error(404, "unknown path (try /, /metrics, /status.json)"),
        }
    }

    /// The admin API: `/services`, behind the bearer token when one is set.
    pub fn admin(&self, r: &Request) -> Response {
        if let Some(token) = &self.token {
            let given = r
                .header("authorization")
                .and_then(|h| h.strip_prefix("Bearer "));
            if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
                return Response::error(401, "a bearer token is required");
            }
        }
        match (r.method.as_str(), r.path.as_str()) {
            ("GET", "/services") => {
                let doc = TableDoc::from_snapshot(&self.table.load());
                Response::json(200, &serde_json::to_value(doc).unwrap_or_default())
            }
            (method, path) if path.starts_with("/services/") => {
                let name = &path["/services/".len()..];
                if matches!(method, "PUT" | "DELETE")
                    && let Some((_, origin)) = lock(&self.owned).get(name)
                {
                    return Response::error(
                        409,
                        format!(
                            "service {:?} is defined at {origin}: change it there (a reload would undo a change made here)",
                            clip(name)
                        ),
                    );
                }
                match method {
                    "GET" => match self.table.load().service(name) {
                        Some(entry) => Response::json(
                            200,
                            &serde_json::to_value(ServiceDoc::from_entry(entry))
                                .unwrap_or_default(),
                        ),
                        None => Response::error(404, format!("service {name:?} does not exist")),
                    },
                    "PUT" => self.put(name, &r.body),
                    "DELETE" => match self.apply(Batch::new().remove(name)) {
                        Ok(g) => {
                            info!(service = name, peer = %r.peer, "service deleted through the admin API");
                            Response::json(200, &serde_json::json!({ "generation": g }))
                        }
                        Err(e @ TableError::UnknownService(_)) => Response::error(404, e),
                        Err(e) => Response::error(400, e),
                    },
                    _ => Response::error(405, "use GET, PUT or DELETE"),
                }
            }
            _ => Response::error(
                404,
                "unknown path (try /services; health and metrics have addresses of their own)",
            ),
        }
    }

    fn put(&self, name: &str, body: &[u8]) -> Response {
        let doc: ServiceDoc = match serde_json::from_slice(body) {
            Ok(d) => d,
            Err(e) => return Response::error(400, format!("service JSON: {e}")),
        };
        if doc.name != name {
            return Response::error(
                400,
                format!("the body names service {:?}, the path {name:?}", doc.name),
            );
        }
        let (service, endpoints) = match doc.to_model() {
            Ok(x) => x,
            Err(e) => return Response::error(400, format!("service {name:?}: {e}")),
        };
        let mut batch = Batch::new().upsert(service);
        if let Some(endpoints) = endpoints {
            batch = batch.replace_endpoints(name, endpoints);
        }
        match self.apply(batch) {
            Ok(g) => {
                info!(service = name, "service set through the admin API");
                Response::json(200, &serde_json::json!({ "generation": g }))
            }
            Err(e @ TableError::Conflict { .. }) => Response::error(409, e),
            Err(e) => Response::error(400, e),
        }
    }

    /// Why the daemon is not healthy: a worker down, shutting down, this node being removed,
    /// or a change waiting for the data path longer than the pending timeout; `None` when
    /// healthy.
    pub fn unhealthy(&self) -> Option<String> {
        if let Some(down) = self.proxy.down() {
            return Some(down.to_string());
        }
        if self.stopping.load(Ordering::SeqCst) {
            return Some(match self.handed_to.load(Ordering::SeqCst) {
                0 => "shutting down".to_string(),
                pid => format!("draining: handed over to svcproxyd pid {pid}"),
            });
        }
        if *lock(&self.node_eligible) == Some(false) {
            return Some(
                "this node is being removed (its Node object is being deleted or has the ToBeDeletedByClusterAutoscaler taint)"
                    .to_string(),
            );
        }
        let (generation, since) = self.unapplied().0?;
        let waited = since.elapsed().unwrap_or_default();
        (waited > self.pending_timeout).then(|| {
            format!(
                "generation {generation}, published {}s ago, is not applied by every worker yet",
                waited.as_secs()
            )
        })
    }

    /// The oldest generation published and not yet applied by every worker, with when it was
    /// published; and the changes such generations carry.
    fn unapplied(&self) -> (Option<(u64, SystemTime)>, Changes) {
        let (applied, at) = self.proxy.synced().unwrap_or((0, SystemTime::UNIX_EPOCH));
        let mut unapplied = lock(&self.unapplied);
        while let Some(done) = unapplied.front().filter(|u| u.generation <= applied) {
            if let Some(event) = done.event {
                self.sync
                    .api_applied(at.duration_since(event).unwrap_or_default());
            }
            unapplied.pop_front();
        }
        let mut pending = Changes::default();
        for u in unapplied.iter() {
            pending += u.changes;
        }
        (
            unapplied.front().map(|u| (u.generation, u.published)),
            pending,
        )
    }

    fn healthz(&self) -> Response {
        let snapshot = self.table.load();
        let rfc3339 = |t: SystemTime| humantime::format_rfc3339_millis(t).to_string();
        let synced = self.proxy.synced();
        let mut body = serde_json::json!({
            "lastUpdated": synced.map(|(_, t)| rfc3339(t)),
            "currentTime": rfc3339(SystemTime::now()),
            "nodeEligible": lock(&self.node_eligible).unwrap_or(true),
            "generation": snapshot.generation(),
            "appliedGeneration": synced.map(|(g, _)| g),
            "pendingSince": self.unapplied().0.map(|(_, t)| rfc3339(t)),
            "backend": format!("{:?}", self.proxy.backend()),
            "bindErrors": self.proxy.bind_errors().iter().map(|(k, e)| format!("{k}: {e}")).collect::<Vec<_>>(),
            "reloads": self.reloads.load(Ordering::SeqCst),
            "lastReloadError": *lock(&self.reload_error),
            "kubernetesApi": lock(&self.api).as_ref().map(|status| {
                let s = lock(status).clone();
                let unreachable = s.unreachable_since.map(|t| t.elapsed().unwrap_or_default());
                serde_json::json!({
                    "synced": s.synced.map(rfc3339),
                    "reachable": unreachable.is_none(),
                    "unreachableSince": s.unreachable_since.map(rfc3339),
                    "unreachableForSeconds": unreachable.map(|d| d.as_secs()),
                    "lastError": s.last_error.as_ref().map(|(_, e)| e),
                    "lastErrorTime": s.last_error.as_ref().map(|&(t, _)| rfc3339(t)),
                    "events": s.events,
                })
            }),
            "socketLb": match (self.proxy.socket_lb(), lock(&self.socket_lb_error).as_ref()) {
                (Some(s), _) => serde_json::json!({
                    "cgroup": s.cgroup.display().to_string(),
                    "frontends": s.frontends,
                }),
                (None, Some(reason)) => serde_json::json!({ "error": reason }),
                (None, None) => serde_json::Value::Null,
            },
            "skipped": self.skipped().into_iter().map(|(source, (invalid, not_served))| {
                (source.name().to_string(), serde_json::json!({
                    "invalid": invalid,
                    "notServed": not_served,
                }))
            }).collect::<serde_json::Map<_, _>>(),
            "workers": self.proxy.workers().iter().map(|w| serde_json::json!({
                "restarts": w.restarts,
                "lastFailure": w.last_failure,
                "down": w.down,
            })).collect::<Vec<_>>(),
        });
        match self.unhealthy() {
            Some(reason) => {
                body["unhealthy"] = reason.into();
                Response::json(503, &body)
            }
            None => Response::json(200, &body),
        }
    }
}

/// The addresses of `addresses` that no interface of this host has (binding them fails).
pub fn unreachable(addresses: &BTreeSet<IpAddr>) -> Vec<IpAddr> {
    addresses
        .iter()
        .copied()
        .filter(|ip| !ip.is_unspecified() && std::net::UdpSocket::bind((*ip, 0)).is_err())
        .collect()
}

/// `e` with where the services it names are defined, as far as `loaded` says.
pub fn explain(e: &TableError, loaded: &Loaded) -> String {
    let at = |name: &str| loaded.origins.get(name).map(String::as_str);
    match e {
        TableError::Conflict { service, other, .. } => {
            let also = at(other).map(|o| format!(" (at {o})")).unwrap_or_default();
            match at(service) {
                Some(origin) => format!("{origin}: {e}{also}"),
                None => format!("{e}{also}"),
            }
        }
        TableError::Invalid { service, .. } | TableError::UnknownService(service) => {
            match at(service) {
                Some(origin) => format!("{origin}: {e}"),
                None => e.to_string(),
            }
        }
        _ => e.to_string(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Daemon {
    /// Records the outcome of a reload (shown by `/healthz`), logging a rejection.
    pub fn reloaded(&self, outcome: Result<u64, String>) {
        match &outcome {
            Ok(generation) => info!(generation, "configuration reloaded"),
            Err(why) => {
                warn!(error = %why, "configuration rejected; the running table is unchanged")
            }
        }
        *lock(&self.reload_error) = outcome.err();
        self.reloads.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_on_no_interface_are_found() {
        let local: IpAddr = "127.0.0.7".parse().unwrap();
        // The documentation range, only bound (which fails), never sent to.
        let foreign: IpAddr = "2001:db8::7".parse().unwrap();
        let all = BTreeSet::from([local, foreign, "0.0.0.0".parse().unwrap()]);
        assert_eq!(unreachable(&all), [foreign]);
    }
}
