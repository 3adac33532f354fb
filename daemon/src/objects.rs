//! Kubernetes manifests (`v1 Service`, `discovery.k8s.io/v1 EndpointSlice`, alone, as
//! multi-document YAML, or as a `List` as `kubectl get svc,endpointslices -A -o yaml` prints
//! it) mapped to services the way kube-proxy maps them:
//!
//! - the cluster IPs (`clusterIPs`, else `clusterIP`), `externalIPs` and load-balancer ingress
//!   IPs (but those of `ipMode: Proxy`) are the frontends, with each port; node ports are
//!   served on the node addresses; `loadBalancerSourceRanges` limits who reaches the
//!   load-balancer IPs; `healthCheckNodePort` (under `externalTrafficPolicy: Local`) is kept;
//! - endpoints come from every EndpointSlice labelled `kubernetes.io/service-name` for the
//!   service; a service port forwards to the slice port of the same name, so named target
//!   ports resolve per endpoint;
//! - conditions: `ready` unset counts as ready, `serving` unset as `ready`, `terminating` unset
//!   as false; `nodeName`, `zone` and `hints` are kept (traffic policy `Local`, topology);
//! - a Node object gives this node's zone (`topology.kubernetes.io/zone`) and whether it may
//!   take load-balancer traffic;
//! - `sessionAffinity: ClientIP` with `timeoutSeconds` (default 10800),
//!   `publishNotReadyAddresses`, `internalTrafficPolicy`, `externalTrafficPolicy`;
//! - headless services (`clusterIP: None`), `ExternalName` services and services labelled
//!   `service.kubernetes.io/service-proxy-name` (owned by another proxy) are ignored.
//!
//! Errors name the object (`Service default/web`, `EndpointSlice default/web-abc`) and field.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::SystemTime;

use serde::Deserialize;
use svcproxy_core::schema::{
    AffinityDoc, EndpointDoc, PolicyDoc, PortDoc, ServiceDoc, TargetDoc, TrafficDoc,
};

pub(crate) mod cluster;
mod fields;

/// The endpoint-slice port name that stands for an unnamed (single) service port.
pub const UNNAMED_PORT: &str = "_";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Object {
    api_version: Option<String>,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    items: Option<Vec<serde_norway::Value>>,
    #[serde(default)]
    spec: Option<serde_norway::Value>,
    #[serde(default)]
    status: Option<serde_norway::Value>,
    #[serde(default)]
    address_type: Option<String>,
    #[serde(default)]
    endpoints: Option<Vec<SliceEndpoint>>,
    #[serde(default)]
    ports: Option<Vec<SlicePort>>,
}

#[derive(Debug, Default, Deserialize)]
struct Metadata {
    name: Option<String>,
    namespace: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "deletionTimestamp")]
    deletion_timestamp: Option<serde_norway::Value>,
}

/// The taint the cluster autoscaler puts on a node it is about to remove; kube-proxy's
/// `/healthz` then says the node is not eligible, so load balancers drain it.
const TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

/// The EndpointSlice annotation saying when the change it carries was triggered (a Pod or
/// Service change), as kube-proxy reads it for its network programming latency.
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceSpec {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs", default)]
    cluster_ips: Option<Vec<String>>,
    #[serde(default)]
    ports: Option<Vec<ServicePortSpec>>,
    #[serde(rename = "externalIPs", default)]
    external_ips: Option<Vec<String>>,
    session_affinity: Option<String>,
    session_affinity_config: Option<AffinityConfig>,
    #[serde(default)]
    publish_not_ready_addresses: bool,
    internal_traffic_policy: Option<String>,
    external_traffic_policy: Option<String>,
    #[serde(default)]
    load_balancer_source_ranges: Option<Vec<String>>,
    health_check_node_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AffinityConfig {
    #[serde(rename = "clientIP")]
    client_ip: Option<ClientIpConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClientIpConfig {
    timeout_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServicePortSpec {
    name: Option<String>,
    protocol: Option<String>,
    port: u16,
    node_port: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceStatus {
    load_balancer: Option<LoadBalancerStatus>,
}

#[derive(Debug, Default, Deserialize)]
struct LoadBalancerStatus {
    #[serde(default)]
    ingress: Vec<Ingress>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Ingress {
    ip: Option<String>,
    /// `VIP` (default) or `Proxy` (KEP-1860: the load balancer proxies, so the address is not
    /// the node's to capture).
    ip_mode: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SliceEndpoint {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: Option<SliceConditions>,
    node_name: Option<String>,
    zone: Option<String>,
    #[serde(default)]
    hints: Option<SliceHints>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SliceHints {
    #[serde(default)]
    for_zones: Vec<Named>,
    #[serde(default)]
    for_nodes: Vec<Named>,
}

#[derive(Debug, Deserialize)]
struct Named {
    name: String,
}

#[derive(Debug, Default, Deserialize)]
struct SliceConditions {
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct SlicePort {
    name: Option<String>,
    protocol: Option<String>,
    port: Option<u16>,
}

/// A manifest that cannot be used, naming the file, the object and the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{object}: {problem}")]
pub struct ManifestError {
    /// e.g. `web.yaml: Service default/web` or `web.yaml: document 3`.
    pub object: String,
    /// What is wrong.
    pub problem: String,
}

/// `errors` one per line, then `warnings`, each marked as one.
pub fn lines(errors: &[impl std::fmt::Display], warnings: &[String]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .chain(warnings.iter().map(|w| format!("warning: {w}")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a set of manifest files describes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Manifests {
    /// The services, sorted by name.
    pub services: Vec<ServiceDoc>,
    /// Where each service is defined (`web.yaml: Service shop/web`), by service name.
    pub origins: BTreeMap<String, String>,
    /// What was ignored and may be a mistake: kinds not read, unknown fields.
    pub warnings: Vec<String>,
    /// When the newest change to each service's endpoints was triggered, by service name,
    /// from its EndpointSlices' `endpoints.kubernetes.io/last-change-trigger-time`.
    pub triggered: BTreeMap<String, SystemTime>,
    /// Nodes among the manifests, by name.
    pub nodes: BTreeMap<String, Node>,
    /// The objects left out, each with what is wrong with it.
    pub errors: Vec<ManifestError>,
    /// The files with a document that does not parse (nothing was read from them), each with
    /// the first problem.
    pub unparsed: BTreeMap<String, ManifestError>,
    /// How many objects were left out because svcproxyd does not serve what they describe
    /// (an SCTP service, an FQDN slice, a kind it does not read); each has a warning.
    pub left_out: usize,
}

/// What svcproxyd reads of a Node object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// Whether it may take load-balancer traffic (false once it is being deleted or carries
    /// the autoscaler's to-be-deleted taint).
    pub eligible: bool,
    /// Its `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
}

/// The Node label naming its zone.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

fn error(object: impl Into<String>, problem: impl Into<String>) -> ManifestError {
    ManifestError {
        object: object.into(),
        problem: problem.into(),
    }
}

/// An EndpointSlice as read.
pub(crate) struct Slice {
    /// `file: EndpointSlice ns/name` (or `EndpointSlice ns/name` from the API), for messages.
    object: String,
    namespace: String,
    service: String,
    name: String,
    /// Its endpoints, one per IP, each with every port of the slice.
    endpoints: Vec<EndpointDoc>,
    /// Its trigger-time annotation, when it has one that parses.
    triggered: Option<SystemTime>,
}

/// A Service as read, before its endpoints are joined.
pub(crate) struct RawService {
    /// `file: Service ns/name` (or `Service ns/name` from the API), for messages.
    object: String,
    namespace: String,
    name: String,
    spec: ServiceSpec,
    status: ServiceStatus,
}

/// One object read, as svcproxyd keeps it.
pub(crate) enum Item {
    Service(RawService),
    Slice(Slice),
    /// A Node, with its name.
    Node(String, Node),
}

/// What [`collect`] gathers from every document.
#[derive(Default)]
struct Collected {
    items: Vec<Item>,
    errors: Vec<ManifestError>,
    notes: Notes,
    unparsed: BTreeMap<String, ManifestError>,
}

/// What reading set aside: warnings, one line each, and how many objects were left out
/// because svcproxyd does not serve what they describe.
#[derive(Debug, Default)]
pub(crate) struct Notes {
    pub warnings: Vec<String>,
    pub left_out: usize,
}

impl Notes {
    fn warn(&mut self, warning: String) {
        self.warnings.push(warning);
    }

    fn leave_out(&mut self, why: String) {
        self.left_out += 1;
        self.warn(why);
    }
}

/// Reads every YAML document in `texts` (each: a file's text and its name for messages) and
/// returns the services they describe. An object that cannot be used is left out, with an
/// error naming it and the field (every one, not only the first); a file with a document that
/// does not parse gives nothing, and is named in [`Manifests::unparsed`] (not in its errors).
pub fn services(texts: &[(String, String)]) -> Manifests {
    let mut found = Collected::default();
    for (file, text) in texts {
        let kept = (found.items.len(), found.notes.warnings.len());
        let unparsed = |found: &mut Collected, error: ManifestError| {
            found.items.truncate(kept.0);
            found.notes.warnings.truncate(kept.1);
            found.unparsed.insert(file.clone(), error);
        };
        // Deep flow nesting would cost libyaml quadratic time: refuse it before parsing.
        if let Err(e) = crate::nesting::check(text) {
            unparsed(&mut found, error(file, e));
            continue;
        }
        for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
            let here = format!("{file}: document {}", i + 1);
            match serde_norway::Value::deserialize(doc) {
                Ok(value) if value.is_null() => {}
                Ok(value) => collect(value, &format!("{file}: "), &here, &mut found),
                Err(e) => {
                    // The rest of the file cannot be trusted to parse, nor what came before.
                    unparsed(&mut found, error(&here, e.to_string()));
                    break;
                }
            }
        }
    }
    let Collected {
        items,
        mut errors,
        mut notes,
        unparsed,
    } = found;
    let mut services = Vec::new();
    let mut nodes = BTreeMap::new();
    let mut by_service: HashMap<(String, String), Vec<Slice>> = HashMap::new();
    let mut slice_names = HashMap::new();
    for item in items {
        match item {
            Item::Service(raw) => services.push(raw),
            Item::Node(name, node) => {
                nodes.insert(name, node);
            }
            Item::Slice(slice) => {
                let key = (slice.namespace.clone(), slice.name.clone());
                if !first_time(&mut slice_names, key, &slice.object, &mut errors) {
                    continue;
                }
                by_service
                    .entry((slice.namespace.clone(), slice.service.clone()))
                    .or_default()
                    .push(slice);
            }
        }
    }
    let mut manifests = Manifests {
        nodes,
        unparsed,
        ..Manifests::default()
    };
    let mut service_names = HashMap::new();
    for raw in services {
        let key = (raw.namespace.clone(), raw.name.clone());
        if !first_time(&mut service_names, key.clone(), &raw.object, &mut errors) {
            continue;
        }
        let slices = by_service.remove(&key).unwrap_or_default();
        match service(&raw, &slices.iter().collect::<Vec<_>>(), &mut notes) {
            Ok(Some(doc)) => {
                if let Some(t) = slices.iter().filter_map(|s| s.triggered).max() {
                    manifests.triggered.insert(doc.name.clone(), t);
                }
                manifests
                    .origins
                    .insert(doc.name.clone(), raw.object.clone());
                manifests.services.push(doc);
            }
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    manifests.services.sort_by(|a, b| a.name.cmp(&b.name));
    manifests.errors = errors;
    manifests.warnings = notes.warnings;
    manifests.left_out = notes.left_out;
    manifests
}

/// Records that `object` is defined as `key` (namespace, name) and returns true, or, when an
/// object of that key came first, adds an error naming both and returns false.
fn first_time(
    seen: &mut HashMap<(String, String), String>,
    key: (String, String),
    object: &str,
    errors: &mut Vec<ManifestError>,
) -> bool {
    if let Some(first) = seen.get(&key) {
        errors.push(error(object, format!("defined twice (first at {first})")));
        return false;
    }
    seen.insert(key, object.to_string());
    true
}

/// Kinds read: a Service, an EndpointSlice, a Node, or lists of them.
const KINDS: [&str; 7] = [
    "Service",
    "EndpointSlice",
    "Node",
    "List",
    "ServiceList",
    "EndpointSliceList",
    "NodeList",
];

/// Reads the document `value` (at `here`, in the file that `origin` names) into `found`.
fn collect(value: serde_norway::Value, origin: &str, here: &str, found: &mut Collected) {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default();
    if !matches!(
        kind,
        "List" | "ServiceList" | "EndpointSliceList" | "NodeList"
    ) {
        match item(value, origin, here, true, &mut found.notes) {
            Ok(Some(item)) => found.items.push(item),
            Ok(None) => {}
            Err(e) => found.errors.push(e),
        }
        return;
    }
    // A List holds a whole cluster dump: its items move out of it, not copied.
    let list: Object = match serde_norway::from_value(value) {
        Ok(o) => o,
        Err(e) => return found.errors.push(error(here, e.to_string())),
    };
    for (j, value) in list.items.unwrap_or_default().into_iter().enumerate() {
        collect(value, origin, &format!("{here}, item {}", j + 1), found);
    }
}

/// An object from the API (a watch event's), as svcproxyd keeps it: `None` for what it does
/// not read (an FQDN slice, a service of another proxy), with a warning when that may matter.
pub(crate) fn api_item(
    value: serde_norway::Value,
    notes: &mut Notes,
) -> Result<Option<Item>, ManifestError> {
    item(value, "", "an object", false, notes)
}

/// The object `value` (not a list; `here` names where it is, `origin` the file with `: `, or
/// nothing), as svcproxyd keeps it. With `check_fields`, a field the API does not define is
/// warned about (a misspelt one in a manifest).
fn item(
    value: serde_norway::Value,
    origin: &str,
    here: &str,
    check_fields: bool,
    notes: &mut Notes,
) -> Result<Option<Item>, ManifestError> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_string();
    let known = match kind.as_str() {
        "Service" => fields::SERVICE,
        "EndpointSlice" => fields::SLICE,
        "Node" => fields::NODE,
        _ => {
            let hint = did_you_mean(&kind, KINDS);
            notes.leave_out(format!("{here}: kind {kind:?} is not read{hint}"));
            return Ok(None);
        }
    };
    // Checked before the value moves into the object; the warnings get its name below.
    let mut unknown = Vec::new();
    if check_fields {
        fields::check(&value, known, "", &mut unknown);
    }
    let object: Object = serde_norway::from_value(value).map_err(|e| error(here, e.to_string()))?;
    let namespace = object
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let Some(name) = object.metadata.name.clone() else {
        return Err(error(here, format!("{kind} without metadata.name")));
    };
    let object_name = format!("{origin}{kind} {namespace}/{}", clip(&name));
    let named = unknown.into_iter().map(|w| format!("{object_name}: {w}"));
    notes.warnings.extend(named);
    let labels = object.metadata.labels.unwrap_or_default();
    let triggered = object
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TRIGGER_TIME))
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok());
    if kind == "Node" {
        let tainted = object
            .spec
            .as_ref()
            .and_then(|spec| spec.get("taints"))
            .and_then(|t| t.as_sequence())
            .is_some_and(|taints| {
                taints
                    .iter()
                    .any(|t| t.get("key").and_then(|k| k.as_str()) == Some(TO_BE_DELETED))
            });
        let deleting = object.metadata.deletion_timestamp.is_some();
        let node = Node {
            eligible: !(tainted || deleting),
            zone: labels.get(ZONE_LABEL).cloned(),
        };
        return Ok(Some(Item::Node(name, node)));
    }
    if kind == "Service" {
        if labels.contains_key("service.kubernetes.io/service-proxy-name") {
            return Ok(None);
        }
        let spec: ServiceSpec = match object.spec {
            Some(v) => serde_norway::from_value(v)
                .map_err(|e| error(&object_name, format!("spec: {e}")))?,
            None => return Err(error(&object_name, "spec is missing")),
        };
        let status: ServiceStatus = match object.status {
            Some(v) => serde_norway::from_value(v).unwrap_or_default(),
            None => ServiceStatus::default(),
        };
        return Ok(Some(Item::Service(RawService {
            object: object_name,
            namespace,
            name,
            spec,
            status,
        })));
    }
    if object
        .api_version
        .as_deref()
        .is_some_and(|v| !v.starts_with("discovery.k8s.io/"))
    {
        return Err(error(
            &object_name,
            "apiVersion must be discovery.k8s.io/v1",
        ));
    }
    if object.address_type.as_deref() == Some("FQDN") {
        notes.leave_out(format!(
            "{object_name}: addressType FQDN is not served (IPv4 and IPv6 are); left out"
        ));
        return Ok(None);
    }
    let Some(service) = labels.get("kubernetes.io/service-name").cloned() else {
        return Err(error(
            &object_name,
            "metadata.labels has no kubernetes.io/service-name",
        ));
    };
    let endpoints = slice_endpoints(
        &object_name,
        object.address_type.as_deref(),
        object.endpoints.unwrap_or_default(),
        &object.ports.unwrap_or_default(),
    )?;
    Ok(Some(Item::Slice(Slice {
        object: object_name,
        namespace,
        service,
        name,
        endpoints,
        triggered,
    })))
}

/// The field of a manifest that a field of the service document made from it (`field`, as
/// validation names it) comes from, for messages.
pub fn manifest_field(doc: &ServiceDoc, field: &str) -> String {
    let (head, rest) = field.split_once('.').unwrap_or((field, ""));
    let index = |h: &str| {
        h.split_once('[')
            .and_then(|(_, i)| i.trim_end_matches(']').parse::<usize>().ok())
    };
    let base = head.split('[').next().unwrap_or_default();
    let suffix = &head[base.len()..];
    match base {
        "name" => "metadata.name".into(),
        "addresses" => format!("spec.clusterIPs{suffix}"),
        "external_addresses" => format!("spec.externalIPs{suffix}"),
        "affinity_timeout_seconds" => "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
        "ports" => {
            let rest = match rest {
                "node_port" => "nodePort",
                "target_port" => "targetPort",
                other => other,
            };
            let dot = if rest.is_empty() { "" } else { "." };
            format!("spec.ports{suffix}{dot}{rest}")
        }
        "endpoints" => {
            let address = index(head)
                .and_then(|i| doc.endpoints.as_ref()?.get(i))
                .map_or("?", |e| e.address.as_str());
            let rest = match rest.split('[').next().unwrap_or_default() {
                "" | "address" => String::new(),
                "node" => ": nodeName".into(),
                "ports" => ": ports".into(),
                other => format!(": {other}"),
            };
            format!("EndpointSlice endpoint {address}{rest}")
        }
        _ => field.into(),
    }
}

/// ` (did you mean X?)` when `given` is a known name in another case or with a letter or two
/// wrong, else nothing.
fn did_you_mean<'k>(given: &str, known: impl IntoIterator<Item = &'k str> + Clone) -> String {
    let same_case = known
        .clone()
        .into_iter()
        .find(|k| k.eq_ignore_ascii_case(given));
    same_case
        .or_else(|| known.into_iter().find(|k| within_two_edits(given, k)))
        .map(|k| format!(" (did you mean {k}?)"))
        .unwrap_or_default()
}

/// Whether `a` becomes `b` by at most two insertions, deletions or substitutions (names of
/// up to 64 bytes; longer ones are not compared).
fn within_two_edits(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() > 64 || b.len() > 64 || a.len().abs_diff(b.len()) > 2 {
        return false;
    }
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let next = (diagonal + usize::from(x != y))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()] <= 2
}

/// At most 64 characters of `text`, for messages (a name can be any length).
fn clip(text: &str) -> String {
    svcproxy_core::error::clip(text).into_owned()
}

fn ip(text: &str, object: &str, field: &str) -> Result<IpAddr, ManifestError> {
    text.parse()
        .map_err(|_| error(object, format!("{field}: {text:?} is not an IP address")))
}

fn traffic(value: Option<&str>, object: &str, field: &str) -> Result<TrafficDoc, ManifestError> {
    match value {
        None | Some("Cluster") => Ok(TrafficDoc::Cluster),
        Some("Local") => Ok(TrafficDoc::Local),
        Some(other) => Err(error(
            object,
            format!("{field}: {other:?} is not Cluster or Local"),
        )),
    }
}

/// The service `raw` with the endpoints of its `slices`; `None` for a service proxied
/// elsewhere (headless, `ExternalName`) or without a port served here (warned about, as is
/// each port left out).
pub(crate) fn service(
    raw: &RawService,
    slices: &[&Slice],
    notes: &mut Notes,
) -> Result<Option<ServiceDoc>, ManifestError> {
    let RawService {
        object,
        namespace,
        name,
        spec,
        status,
    } = raw;
    let object = object.as_str();
    if spec.kind.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let mut cluster_ips = spec.cluster_ips.clone().unwrap_or_default();
    if cluster_ips.is_empty() {
        cluster_ips.extend(spec.cluster_ip.clone());
    }
    if cluster_ips.iter().any(|c| c == "None") {
        return Ok(None);
    }
    let addresses = cluster_ips
        .iter()
        .enumerate()
        .map(|(i, c)| ip(c, object, &format!("spec.clusterIPs[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let external_addresses = spec
        .external_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| ip(c, object, &format!("spec.externalIPs[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut load_balancer_addresses = Vec::new();
    for (i, ingress) in status
        .load_balancer
        .iter()
        .flat_map(|lb| &lb.ingress)
        .enumerate()
    {
        let Some(text) = &ingress.ip else { continue };
        let addr = ip(
            text,
            object,
            &format!("status.loadBalancer.ingress[{i}].ip"),
        )?;
        let proxied = ingress.ip_mode.as_deref() == Some("Proxy");
        if !proxied
            && !external_addresses.contains(&addr)
            && !load_balancer_addresses.contains(&addr)
        {
            load_balancer_addresses.push(addr);
        }
    }
    let load_balancer_source_ranges = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, text)| {
            text.trim().parse().map_err(|_| {
                let field = format!("spec.loadBalancerSourceRanges[{i}]");
                error(object, format!("{field}: {text:?} is not a CIDR range"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => svcproxy::Protocol::Tcp,
            "UDP" => svcproxy::Protocol::Udp,
            other => {
                notes.warn(format!(
                    "{object}: spec.ports[{i}]: protocol {other} is not served (TCP and UDP are); the port is left out"
                ));
                continue;
            }
        };
        let port_name = p.name.clone().filter(|n| !n.is_empty());
        ports.push(PortDoc {
            target_port: Some(TargetDoc::Name(
                port_name.clone().unwrap_or_else(|| UNNAMED_PORT.into()),
            )),
            name: port_name,
            protocol,
            port: p.port,
            node_port: p.node_port,
        });
    }
    if ports.is_empty() && spec.ports.as_ref().is_some_and(|p| !p.is_empty()) {
        notes.leave_out(format!("{object}: no port is served here; left out"));
        return Ok(None);
    }
    let (session_affinity, affinity_timeout_seconds) = match spec.session_affinity.as_deref() {
        None | Some("None") => (AffinityDoc::None, None),
        Some("ClientIP") => (
            AffinityDoc::ClientIp,
            Some(
                spec.session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds)
                    .unwrap_or(10_800),
            ),
        ),
        Some(other) => {
            return Err(error(
                object,
                format!("spec.sessionAffinity: {other:?} is not None or ClientIP"),
            ));
        }
    };
    let mut endpoints = endpoints(slices);
    // Kubernetes lets a slice carry ports the service does not target (during a change of
    // ports, say): an endpoint no service port reaches serves nothing here, and is left out.
    endpoints.retain(|e| {
        ports
            .iter()
            .any(|p| matches!(&p.target_port, Some(TargetDoc::Name(n)) if e.ports.contains_key(n)))
    });
    let external_traffic_policy = traffic(
        spec.external_traffic_policy.as_deref(),
        object,
        "spec.externalTrafficPolicy",
    )?;
    Ok(Some(ServiceDoc {
        name: format!("{namespace}/{name}"),
        addresses,
        external_addresses,
        load_balancer_addresses,
        load_balancer_source_ranges,
        // kube-proxy serves it only under policy Local (the API allocates it only then).
        health_check_node_port: spec
            .health_check_node_port
            .filter(|_| external_traffic_policy == TrafficDoc::Local),
        ports,
        policy: PolicyDoc::RoundRobin,
        maglev_table_size: None,
        session_affinity,
        affinity_timeout_seconds,
        publish_not_ready: spec.publish_not_ready_addresses,
        internal_traffic_policy: traffic(
            spec.internal_traffic_policy.as_deref(),
            object,
            "spec.internalTrafficPolicy",
        )?,
        external_traffic_policy,
        max_connections: None,
        endpoints: Some(endpoints),
    }))
}

fn hinted(names: Option<&Vec<Named>>) -> Vec<String> {
    names
        .into_iter()
        .flatten()
        .map(|n| n.name.clone())
        .collect()
}

/// The endpoints of every slice, one per IP: an IP in several slices (with different ports)
/// gets the union of their named ports.
fn endpoints(slices: &[&Slice]) -> Vec<EndpointDoc> {
    let mut by_ip: BTreeMap<&str, EndpointDoc> = BTreeMap::new();
    for e in slices.iter().flat_map(|s| &s.endpoints) {
        match by_ip.get_mut(e.address.as_str()) {
            Some(first) => first
                .ports
                .extend(e.ports.iter().map(|(n, p)| (n.clone(), *p))),
            None => {
                by_ip.insert(&e.address, e.clone());
            }
        }
    }
    by_ip.into_values().collect()
}

/// The endpoints of one slice (`object` names it), one per IP, each with every port of the
/// slice; an error names the first field that is wrong.
fn slice_endpoints(
    object: &str,
    address_type: Option<&str>,
    endpoints: Vec<SliceEndpoint>,
    slice_ports: &[SlicePort],
) -> Result<Vec<EndpointDoc>, ManifestError> {
    let mut ports = BTreeMap::new();
    for (i, p) in slice_ports.iter().enumerate() {
        if p.protocol
            .as_deref()
            .is_some_and(|x| x != "TCP" && x != "UDP")
        {
            continue;
        }
        let Some(port) = p.port else { continue };
        let name = p
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| UNNAMED_PORT.into());
        if ports.insert(name, port).is_some() {
            return Err(error(object, format!("ports[{i}].name is used twice")));
        }
    }
    let mut by_ip: BTreeMap<IpAddr, EndpointDoc> = BTreeMap::new();
    for (j, e) in endpoints.into_iter().enumerate() {
        let c = e.conditions.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        for (k, address) in e.addresses.iter().enumerate() {
            let field = format!("endpoints[{j}].addresses[{k}]");
            let addr = ip(address, object, &field)?;
            let family_ok = match address_type {
                Some("IPv4") => addr.is_ipv4(),
                Some("IPv6") => addr.is_ipv6(),
                _ => true,
            };
            if !family_ok {
                let problem = format!(
                    "{field}: {addr} is not an address of the slice's addressType {}",
                    address_type.unwrap_or_default()
                );
                return Err(error(object, problem));
            }
            by_ip.entry(addr).or_insert_with(|| EndpointDoc {
                address: addr.to_string(),
                ports: ports.clone(),
                ready,
                serving: Some(c.and_then(|c| c.serving).unwrap_or(ready)),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                weight: 1,
                node: e.node_name.clone(),
                zone: e.zone.clone(),
                for_zones: hinted(e.hints.as_ref().map(|h| &h.for_zones)),
                for_nodes: hinted(e.hints.as_ref().map(|h| &h.for_nodes)),
            });
        }
    }
    Ok(by_ip.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_eligible_unless_tainted_for_deletion_or_being_deleted_and_have_a_zone() {
        let yaml = "
kind: Node
metadata: {name: a, labels: {topology.kubernetes.io/zone: z1}}
spec: {taints: [{key: other, effect: NoSchedule}]}
---
kind: Node
metadata: {name: b}
spec: {taints: [{key: ToBeDeletedByClusterAutoscaler, value: '1', effect: NoSchedule}]}
---
kind: Node
metadata: {name: c, deletionTimestamp: '2026-12-01T00:00:00Z'}
";
        let m = services(&[("nodes.yaml".into(), yaml.into())]);
        let expected = [
            ("a", true, Some("z1")),
            ("b", false, None),
            ("c", false, None),
        ];
        let node = |(name, eligible, zone): (&str, bool, Option<&str>)| {
            let zone = zone.map(str::to_string);
            (name.to_string(), Node { eligible, zone })
        };
        assert_eq!(m.nodes, expected.map(node).into_iter().collect());
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
    }

    fn load(yaml: &str) -> Result<Vec<ServiceDoc>, String> {
        let m = services(&[("test.yaml".into(), yaml.into())]);
        let errors: Vec<&ManifestError> = m.errors.iter().chain(m.unparsed.values()).collect();
        if errors.is_empty() {
            Ok(m.services)
        } else {
            Err(lines(&errors, &m.warnings))
        }
    }

    const SERVICE: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIPs: [198.18.0.10, '::1']
  externalIPs: [198.18.2.7]
  ports:
  - {name: http, port: 80, targetPort: web, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  publishNotReadyAddresses: true
  internalTrafficPolicy: Local
  externalTrafficPolicy: Local
  healthCheckNodePort: 31000
  loadBalancerSourceRanges: [198.18.50.0/24, ' 2001:db8:50::/48 ']
status:
  loadBalancer: {ingress: [{ip: 198.18.3.1, ipMode: VIP}, {ip: 198.18.3.2, ipMode: Proxy}]}
";

    const SLICES: &str = "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [198.19.1.5]
  conditions: {ready: true}
  nodeName: node-a
  zone: z1
  hints: {forZones: [{name: z1}], forNodes: [{name: node-a}]}
- addresses: [198.19.2.7]
  conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-2, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints:
- addresses: [198.19.1.5]
- addresses: [198.19.3.9]
";

    #[test]
    fn a_service_and_its_slices_map_like_kube_proxy() {
        let docs = load(&format!("{SERVICE}---{SLICES}")).unwrap();
        assert_eq!(docs.len(), 1);
        let s = &docs[0];
        assert_eq!(s.name, "shop/web");
        assert_eq!(
            s.addresses,
            [
                "198.18.0.10".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(
            s.external_addresses,
            ["198.18.2.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            s.load_balancer_addresses,
            ["198.18.3.1".parse::<IpAddr>().unwrap()],
            "the ingress of ipMode Proxy is the load balancer's, not captured here"
        );
        let ranges: Vec<String> = s
            .load_balancer_source_ranges
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(ranges, ["198.18.50.0/24", "2001:db8:50::/48"]);
        assert_eq!(s.external_traffic_policy, TrafficDoc::Local);
        assert_eq!(s.health_check_node_port, Some(31000));
        assert_eq!(
            s.ports[0].target_port,
            Some(TargetDoc::Name("http".into())),
            "service port name"
        );
        assert_eq!(s.ports[0].node_port, Some(30080));
        assert_eq!(s.ports[1].protocol, svcproxy::Protocol::Udp);
        assert_eq!(s.session_affinity, AffinityDoc::ClientIp);
        assert_eq!(s.affinity_timeout_seconds, Some(600));
        assert!(s.publish_not_ready);
        assert_eq!(s.internal_traffic_policy, TrafficDoc::Local);
        let eps = s.endpoints.as_ref().unwrap();
        assert_eq!(eps.len(), 3, "one endpoint per IP across slices");
        let pod = eps.iter().find(|e| e.address == "198.19.1.5").unwrap();
        assert_eq!(pod.ports.get("http"), Some(&8080));
        assert_eq!(
            pod.ports.get("dns"),
            Some(&5353),
            "ports merged from both slices"
        );
        assert_eq!(
            (pod.node.as_deref(), pod.zone.as_deref()),
            (Some("node-a"), Some("z1"))
        );
        assert_eq!(
            (&pod.for_zones[..], &pod.for_nodes[..]),
            (&["z1".to_string()][..], &["node-a".to_string()][..])
        );
        let draining = eps.iter().find(|e| e.address == "198.19.2.7").unwrap();
        assert!(!draining.ready && draining.serving == Some(true) && draining.terminating);
        let unknown = eps.iter().find(|e| e.address == "198.19.3.9").unwrap();
        assert!(unknown.ready, "unset ready counts as ready");
        // And the table accepts it.
        let (service, endpoints) = s.to_model().unwrap();
        let table = svcproxy::Table::default();
        let batch = svcproxy::Batch::new()
            .upsert(service)
            .replace_endpoints("shop/web", endpoints.unwrap());
        table.apply(batch).unwrap();
    }

    #[test]
    fn a_health_check_node_port_is_kept_only_under_policy_local() {
        let yaml = |policy: &str| {
            format!(
                "kind: Service\nmetadata: {{name: lb}}\nspec: {{clusterIP: 198.18.0.4, type: LoadBalancer, \
                 externalTrafficPolicy: {policy}, healthCheckNodePort: 31000, ports: [{{port: 80, nodePort: 30080}}]}}"
            )
        };
        assert_eq!(
            load(&yaml("Local")).unwrap()[0].health_check_node_port,
            Some(31000)
        );
        assert_eq!(
            load(&yaml("Cluster")).unwrap()[0].health_check_node_port,
            None
        );
    }

    #[test]
    fn a_kubectl_list_is_read_and_unnamed_ports_match() {
        let yaml = "
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: one}
  spec: {clusterIP: 198.18.0.1, ports: [{port: 443, targetPort: 6443}]}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: one-x, labels: {kubernetes.io/service-name: one}}
  addressType: IPv4
  ports: [{port: 6443}]
  endpoints: [{addresses: [198.19.0.1]}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: empty, labels: {kubernetes.io/service-name: one}}
  addressType: IPv4
  ports: null
  endpoints: null
";
        let docs = load(yaml).unwrap();
        assert_eq!(docs[0].name, "default/one");
        assert_eq!(
            docs[0].ports[0].target_port,
            Some(TargetDoc::Name(UNNAMED_PORT.into()))
        );
        let eps = docs[0].endpoints.as_ref().unwrap();
        assert_eq!(eps[0].ports.get(UNNAMED_PORT), Some(&6443));
    }

    #[test]
    fn headless_external_name_and_foreign_services_are_ignored() {
        let yaml = "
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.org}
---
apiVersion: v1
kind: Service
metadata: {name: other, labels: {service.kubernetes.io/service-proxy-name: cilium}}
spec: {clusterIP: 198.18.0.5, ports: [{port: 80}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: not-ours}
spec: {replicas: 3}
";
        let found = services(&[("test.yaml".into(), yaml.into())]);
        assert!(found.services.is_empty());
        assert!(
            found.origins.is_empty(),
            "an ignored service is not the file's to own"
        );
    }

    #[test]
    fn what_is_not_served_is_left_out_with_a_warning_and_the_rest_is_served() {
        let yaml = "kind: Service\nmetadata: {name: sig, namespace: telco}\nspec: {clusterIP: 198.18.0.3, ports: [{port: 36412, protocol: SCTP}]}\n---\n\
                    kind: Service\nmetadata: {name: mixed}\nspec: {clusterIP: 198.18.0.4, ports: [{name: a, port: 80}, {name: b, port: 9, protocol: SCTP}]}\n---\n\
                    apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: f, labels: {kubernetes.io/service-name: mixed}}\naddressType: FQDN\nendpoints: [{addresses: [example.test]}]\n---\n\
                    kind: Service\nmetadata: {name: bad}\nspec: {clusterIP: 198.18.0.300, ports: [{port: 80}]}\n---\n\
                    kind: Deployment\nmetadata: {name: d}\n";
        let m = services(&[("dump.yaml".into(), yaml.into())]);
        let names: Vec<&str> = m.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["default/mixed"], "what can be served is");
        assert_eq!(m.services[0].ports.len(), 1);
        assert_eq!(
            m.warnings,
            [
                "dump.yaml: EndpointSlice default/f: addressType FQDN is not served (IPv4 and IPv6 are); left out",
                "dump.yaml: document 5: kind \"Deployment\" is not read",
                "dump.yaml: Service telco/sig: spec.ports[0]: protocol SCTP is not served (TCP and UDP are); the port is left out",
                "dump.yaml: Service telco/sig: no port is served here; left out",
                "dump.yaml: Service default/mixed: spec.ports[1]: protocol SCTP is not served (TCP and UDP are); the port is left out",
            ]
        );
        let errors: Vec<String> = m.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "dump.yaml: Service default/bad: spec.clusterIPs[0]: \"198.18.0.300\" is not an IP address"
            ]
        );
        assert!(m.unparsed.is_empty());
        assert_eq!(m.left_out, 3, "sig, the FQDN slice and the Deployment");
    }

    #[test]
    fn a_file_that_does_not_parse_gives_nothing_and_is_named() {
        let good = "kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 198.18.0.3, ports: [{port: 80}]}\n";
        let broken = format!("{good}---\nkind: [unclosed\n");
        let m = services(&[
            ("good.yaml".into(), good.into()),
            ("broken.yaml".into(), broken.replace("name: a", "name: b")),
        ]);
        let names: Vec<&str> = m.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["default/a"],
            "nothing of the broken file, not even its first document"
        );
        let broken: Vec<String> = m.unparsed.values().map(ToString::to_string).collect();
        assert!(
            broken.len() == 1 && broken[0].starts_with("broken.yaml: document 2"),
            "{broken:?}"
        );
        assert!(m.errors.is_empty());
    }

    #[test]
    fn bad_manifests_name_the_object_and_field() {
        let err = |yaml: &str| load(yaml).unwrap_err();
        assert_eq!(
            err(
                "kind: Service\nmetadata: {name: web}\nspec: {clusterIP: 198.18.0.300, ports: [{port: 80}]}"
            ),
            "test.yaml: Service default/web: spec.clusterIPs[0]: \"198.18.0.300\" is not an IP address"
        );
        assert_eq!(
            err(
                "kind: Service\nmetadata: {name: web}\nspec: {clusterIP: 198.18.0.3, sessionAffinity: Sticky, ports: [{port: 80}]}"
            ),
            "test.yaml: Service default/web: spec.sessionAffinity: \"Sticky\" is not None or ClientIP"
        );
        assert_eq!(
            err(
                "kind: Service\nmetadata: {name: web}\nspec: {clusterIP: 198.18.0.3, loadBalancerSourceRanges: [198.18.0.0/33], ports: [{port: 80}]}"
            ),
            "test.yaml: Service default/web: spec.loadBalancerSourceRanges[0]: \"198.18.0.0/33\" is not a CIDR range"
        );
        assert_eq!(
            err(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4"
            ),
            "test.yaml: EndpointSlice default/s: metadata.labels has no kubernetes.io/service-name"
        );
        assert!(
            err("kind: Service\nmetadata: {name: web}\nspec: {ports: [{port: eighty}]}")
                .starts_with("test.yaml: Service default/web: spec:")
        );
        assert!(err("kind: [unclosed").starts_with("test.yaml: document 1:"));
        let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, labels: {kubernetes.io/service-name: web}}\n\
                     addressType: IPv4\nendpoints: [{addresses: [198.19.0.999]}]\n---\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 198.18.0.3, ports: [{port: 80}]}";
        assert_eq!(
            err(slice),
            "test.yaml: EndpointSlice default/s: endpoints[0].addresses[0]: \"198.19.0.999\" is not an IP address"
        );
    }
}
