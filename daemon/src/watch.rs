//! The Kubernetes API source: watches of Services and EndpointSlices in all namespaces (with
//! kube-proxy's label selector, [`SELECTOR`]) and of this node's Node, on a thread of their
//! own, turned into [`Update`]s for the main loop to publish.
//!
//! Nothing is sent before the first full list of every kind watched; then each update holds
//! the services the events since the last one touched, and only those (an EndpointSlice
//! changed: its service, with all its endpoints). Events that arrive together become one
//! update. Relists, `410 Gone`, bookmarks and dropped connections are the watcher's (kube's
//! runtime, with its default backoff): a relist forgets what the new list no longer holds.
//! While the API does not answer, nothing is sent (the table stays as it was) and
//! [`Status::unreachable_since`] says since when; the API is asked for its version every
//! [`PROBE_EVERY`] until it answers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Node as NodeObject, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::objects::cluster::{Cluster, Key, Kind};
use crate::objects::{self, Node, Notes};
use crate::publish::{self, Wanted};

/// kube-proxy's label selector for Services and EndpointSlices: none owned by another proxy
/// (`service.kubernetes.io/service-proxy-name`), no slices of headless services.
pub const SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// How often an API that stopped answering is asked whether it answers again.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// How svcproxyd reaches the API.
#[derive(Debug, Clone)]
pub enum Connect {
    /// With a kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// As a pod: its service account's token and `KUBERNETES_SERVICE_HOST`.
    InCluster,
}

/// What changed in the API since the last update.
#[derive(Debug, Default)]
pub struct Update {
    /// Each service touched: what it is now (`None`: gone). A service that cannot be used is
    /// not named (it stays as it was) and is in `skipped`.
    pub wanted: BTreeMap<String, Option<Wanted>>,
    /// Where each service of `wanted` comes from, for messages.
    pub origins: BTreeMap<String, String>,
    /// When each change of endpoints was triggered (the slices' trigger-time annotation).
    pub triggered: BTreeMap<String, SystemTime>,
    /// This node's Node, when it is watched and exists.
    pub node: Option<Node>,
    /// Every warning about the objects held, one line each.
    pub warnings: Vec<String>,
    /// Every object that cannot be used, with why.
    pub skipped: Vec<String>,
    /// How many objects are not served here (FQDN slices, services without a TCP/UDP port).
    pub left_out: usize,
    /// When the first event this update holds arrived.
    pub received: Option<Instant>,
}

/// How the watches stand, for `/healthz`.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// When every kind watched was first listed whole.
    pub synced: Option<SystemTime>,
    /// Since when the API has not answered (`None`: it answers).
    pub unreachable_since: Option<SystemTime>,
    /// The last error from the API, and when.
    pub last_error: Option<(SystemTime, String)>,
    /// Watch events received.
    pub events: u64,
}

/// A running watch.
pub struct Watch {
    /// The updates, in order.
    pub updates: mpsc::Receiver<Update>,
    /// How the watches stand.
    pub status: Arc<Mutex<Status>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Connects as `connect` says and starts watching (this node's Node too, when `node` names
/// it). An error names what cannot be read (the kubeconfig, the in-cluster environment).
pub fn start(connect: &Connect, node: Option<String>) -> Result<Watch, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the Kubernetes client's runtime: {e}"))?;
    let client = runtime.block_on(client(connect))?;
    let (tx, updates) = mpsc::channel();
    let status = Arc::new(Mutex::new(Status::default()));
    let shared = status.clone();
    std::thread::Builder::new()
        .name("svcproxyd-api".into())
        .spawn(move || runtime.block_on(watch(client, node, tx, shared)))
        .map_err(|e| format!("cannot start the Kubernetes watch: {e}"))?;
    Ok(Watch { updates, status })
}

async fn client(connect: &Connect) -> Result<Client, String> {
    let config = match connect {
        Connect::Kubeconfig(path) => {
            let bad = |e: &dyn std::fmt::Display| format!("--kubeconfig {}: {e}", path.display());
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(&e))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| bad(&e))?
        }
        Connect::InCluster => {
            kube::Config::incluster().map_err(|e| format!("--in-cluster: {e}"))?
        }
    };
    Client::try_from(config).map_err(|e| format!("cannot make a Kubernetes client: {e}"))
}

/// An event of one watch, its object as a document (what the manifest mapping reads).
type Tagged = (
    Kind,
    Result<watcher::Event<serde_norway::Value>, watcher::Error>,
);

fn watched<K>(api: Api<K>, kind: Kind, config: watcher::Config) -> BoxStream<'static, Tagged>
where
    K: kube::Resource + Clone + DeserializeOwned + Serialize + Debug + Send + 'static,
    K::DynamicType: Default,
{
    watcher(api, config)
        .default_backoff()
        .map(move |event| (kind, event.map(document)))
        .boxed()
}

/// `event` with its object as a document (`Null` if it cannot be written as one: ignored).
fn document<K: Serialize>(event: watcher::Event<K>) -> watcher::Event<serde_norway::Value> {
    use watcher::Event::*;
    let doc = |k: K| serde_norway::to_value(&k).unwrap_or(serde_norway::Value::Null);
    match event {
        Apply(k) => Apply(doc(k)),
        Delete(k) => Delete(doc(k)),
        Init => Init,
        InitApply(k) => InitApply(doc(k)),
        InitDone => InitDone,
    }
}

async fn watch(
    client: Client,
    node: Option<String>,
    tx: mpsc::Sender<Update>,
    status: Arc<Mutex<Status>>,
) {
    let all = || watcher::Config::default().labels(SELECTOR);
    let mut streams = vec![
        watched(Api::<Service>::all(client.clone()), Kind::Service, all()),
        watched(
            Api::<EndpointSlice>::all(client.clone()),
            Kind::EndpointSlice,
            all(),
        ),
    ];
    if let Some(name) = &node {
        let this = watcher::Config::default().fields(&format!("metadata.name={name}"));
        streams.push(watched(
            Api::<NodeObject>::all(client.clone()),
            Kind::Node,
            this,
        ));
    }
    let mut events = futures_util::stream::select_all(streams);
    let mut state = State::new(node);
    loop {
        let next = if lock(&status).unreachable_since.is_some() {
            tokio::select! {
                event = events.next() => event,
                () = tokio::time::sleep(PROBE_EVERY) => {
                    if client.apiserver_version().await.is_ok() {
                        answers(&status);
                    }
                    continue;
                }
            }
        } else {
            events.next().await
        };
        let Some(first) = next else { return };
        let received = Instant::now();
        state.handle(first, &status);
        // What has arrived meanwhile joins this update.
        while let Some(Some(event)) = events.next().now_or_never() {
            state.handle(event, &status);
        }
        if let Some(mut update) = state.update() {
            update.received = Some(received);
            if tx.send(update).is_err() {
                return;
            }
        }
    }
}

/// The API answers (again).
fn answers(status: &Mutex<Status>) {
    let mut s = lock(status);
    if let Some(since) = s.unreachable_since.take() {
        let down = since.elapsed().unwrap_or_default();
        info!(after = ?down, "the Kubernetes API answers again");
    }
}

/// What the watch keeps between events.
struct State {
    cluster: Cluster,
    node: Option<String>,
    /// Kinds not yet listed whole.
    unlisted: BTreeSet<Kind>,
    /// Services touched since the last update.
    touched: BTreeSet<Key>,
    /// Services that the table would refuse, with why (they stay as they were).
    refused: BTreeMap<Key, String>,
    /// Warnings about each service as mapped, and whether it is not served here.
    service_notes: BTreeMap<Key, (Vec<String>, bool)>,
    node_changed: bool,
}

impl State {
    fn new(node: Option<String>) -> Self {
        let mut unlisted = BTreeSet::from([Kind::Service, Kind::EndpointSlice]);
        if node.is_some() {
            unlisted.insert(Kind::Node);
        }
        Self {
            cluster: Cluster::default(),
            node,
            unlisted,
            touched: BTreeSet::new(),
            refused: BTreeMap::new(),
            service_notes: BTreeMap::new(),
            node_changed: false,
        }
    }

    fn handle(&mut self, (kind, event): Tagged, status: &Mutex<Status>) {
        use watcher::Event::*;
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                let mut s = lock(status);
                let now = SystemTime::now();
                if s.unreachable_since.is_none() {
                    warn!("the Kubernetes API does not answer ({e}); serving what it said last");
                    s.unreachable_since = Some(now);
                }
                s.last_error = Some((now, e.to_string()));
                return;
            }
        };
        lock(status).events += 1;
        answers(status);
        self.node_changed |= kind == Kind::Node;
        match event {
            Apply(value) | InitApply(value) => {
                let touched = self.cluster.apply(kind, value);
                self.touched.extend(touched);
            }
            Delete(value) => {
                let touched = self.cluster.delete(kind, &value);
                self.touched.extend(touched);
            }
            Init => self.cluster.listing(kind),
            InitDone => {
                let touched = self.cluster.listed(kind);
                self.touched.extend(touched);
                if self.unlisted.remove(&kind) && self.unlisted.is_empty() {
                    lock(status).synced = Some(SystemTime::now());
                    info!("listed the Kubernetes API's services and endpoint slices");
                }
            }
        }
    }

    /// What changed since the last update, once every kind was listed whole and something
    /// changed.
    fn update(&mut self) -> Option<Update> {
        if !self.unlisted.is_empty() || (self.touched.is_empty() && !self.node_changed) {
            return None;
        }
        self.node_changed = false;
        let mut update = Update::default();
        for key in std::mem::take(&mut self.touched) {
            let name = format!("{}/{}", key.0, key.1);
            let mut notes = Notes::default();
            let found = self.cluster.service(&key, &mut notes);
            if notes.warnings.is_empty() {
                self.service_notes.remove(&key);
            } else {
                let not_served = notes.left_out > 0;
                self.service_notes
                    .insert(key.clone(), (notes.warnings, not_served));
            }
            let problem = match found {
                Ok(None) => {
                    update.wanted.insert(name, None);
                    None
                }
                Ok(Some((doc, triggered))) => match publish::wanted(&doc) {
                    Ok(wanted) => {
                        update.wanted.insert(name.clone(), Some(wanted));
                        update
                            .origins
                            .insert(name.clone(), format!("the Kubernetes API: Service {name}"));
                        if let Some(t) = triggered {
                            update.triggered.insert(name, t);
                        }
                        None
                    }
                    Err(e) => {
                        let field = objects::manifest_field(&doc, &e.field);
                        Some(format!("Service {name}: {field}: {}", e.problem))
                    }
                },
                Err(e) => Some(e.to_string()),
            };
            match problem {
                Some(why) => self.refused.insert(key, why),
                None => self.refused.remove(&key),
            };
        }
        update.node = self
            .node
            .as_deref()
            .and_then(|n| self.cluster.node(n))
            .cloned();
        update.skipped = self
            .cluster
            .invalid()
            .map(str::to_string)
            .chain(self.refused.values().cloned())
            .collect();
        update.warnings = self
            .cluster
            .warnings()
            .map(str::to_string)
            .chain(self.service_notes.values().flat_map(|(w, _)| w.clone()))
            .collect();
        update.left_out =
            self.cluster.not_served() + self.service_notes.values().filter(|(_, n)| *n).count();
        Some(update)
    }
}
