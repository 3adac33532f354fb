//! Kubernetes manifests (`v1 Service`, `discovery.k8s.io/v1 EndpointSlice`, alone, as
//! multi-document YAML, or as a `List` as `kubectl get svc,endpointslices -A -o yaml` prints
//! it) mapped to services the way kube-proxy maps them:
//!
//! - the cluster IPs (`clusterIPs`, else `clusterIP`), `externalIPs` and load-balancer ingress
//!   IPs are the frontends, with each port; node ports are served on the node addresses;
//! - endpoints come from every EndpointSlice labelled `kubernetes.io/service-name` for the
//!   service; a service port forwards to the slice port of the same name, so named target
//!   ports resolve per endpoint;
//! - conditions: `ready` unset counts as ready, `serving` unset as `ready`, `terminating` unset
//!   as false; `nodeName` and `zone` are kept (traffic policy `Local`);
//! - `sessionAffinity: ClientIP` with `timeoutSeconds` (default 10800),
//!   `publishNotReadyAddresses`, `internalTrafficPolicy`, `externalTrafficPolicy`;
//! - headless services (`clusterIP: None`), `ExternalName` services and services labelled
//!   `service.kubernetes.io/service-proxy-name` (owned by another proxy) are ignored.
//!
//! Errors name the object (`Service default/web`, `EndpointSlice default/web-abc`) and field.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use serde::Deserialize;
use svcproxy_core::schema::{
    AffinityDoc, EndpointDoc, PolicyDoc, PortDoc, ServiceDoc, TargetDoc, TrafficDoc,
};

/// The endpoint-slice port name that stands for an unnamed (single) service port.
pub const UNNAMED_PORT: &str = "_";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Object {
    api_version: Option<String>,
    kind: Option<String>,
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
}

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
struct Ingress {
    ip: Option<String>,
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

/// A manifest that cannot be used, naming the object and field.
#[derive(Debug, thiserror::Error)]
#[error("{object}: {problem}")]
pub struct ManifestError {
    /// e.g. `Service default/web` or `document 3`.
    pub object: String,
    /// What is wrong.
    pub problem: String,
}

fn error(object: impl Into<String>, problem: impl Into<String>) -> ManifestError {
    ManifestError {
        object: object.into(),
        problem: problem.into(),
    }
}

struct Slice {
    namespace: String,
    service: String,
    name: String,
    endpoints: Vec<SliceEndpoint>,
    ports: Vec<SlicePort>,
}

/// Reads every YAML document in `texts` (each: a file's text and its name for messages) and
/// returns the services they describe, sorted by name.
pub fn services(texts: &[(String, String)]) -> Result<Vec<ServiceDoc>, ManifestError> {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for (file, text) in texts {
        // Deep flow nesting would cost libyaml quadratic time: refuse it before parsing.
        crate::nesting::check(text).map_err(|e| error(file, e))?;
        for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
            let here = format!("{file}: document {}", i + 1);
            let value =
                serde_norway::Value::deserialize(doc).map_err(|e| error(&here, e.to_string()))?;
            if value.is_null() {
                continue;
            }
            collect(value, &here, &mut services, &mut slices)?;
        }
    }
    let mut by_service: HashMap<(String, String), Vec<Slice>> = HashMap::new();
    for slice in slices {
        by_service
            .entry((slice.namespace.clone(), slice.service.clone()))
            .or_default()
            .push(slice);
    }
    let mut docs = Vec::new();
    for (namespace, name, spec, status) in services {
        let slices = by_service
            .remove(&(namespace.clone(), name.clone()))
            .unwrap_or_default();
        if let Some(doc) = service(&namespace, &name, spec, status, &slices)? {
            docs.push(doc);
        }
    }
    docs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(docs)
}

type RawService = (String, String, ServiceSpec, ServiceStatus);

fn collect(
    value: serde_norway::Value,
    here: &str,
    services: &mut Vec<RawService>,
    slices: &mut Vec<Slice>,
) -> Result<(), ManifestError> {
    let object: Object = serde_norway::from_value(value).map_err(|e| error(here, e.to_string()))?;
    let kind = object.kind.clone().unwrap_or_default();
    let namespace = object
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = object.metadata.name.clone();
    let what = |k: &str| format!("{k} {namespace}/{}", name.as_deref().unwrap_or("?"));
    match kind.as_str() {
        "List" | "ServiceList" | "EndpointSliceList" => {
            for (j, item) in object.items.unwrap_or_default().into_iter().enumerate() {
                collect(item, &format!("{here}, item {}", j + 1), services, slices)?;
            }
        }
        "Service" => {
            let here_named = what("Service");
            let name = name.ok_or_else(|| error(here, "Service without metadata.name"))?;
            let here = here_named;
            let labels = object.metadata.labels.unwrap_or_default();
            if labels.contains_key("service.kubernetes.io/service-proxy-name") {
                return Ok(());
            }
            let spec: ServiceSpec = match object.spec {
                Some(v) => {
                    serde_norway::from_value(v).map_err(|e| error(&here, format!("spec: {e}")))?
                }
                None => return Err(error(here, "spec is missing")),
            };
            let status: ServiceStatus = match object.status {
                Some(v) => serde_norway::from_value(v).unwrap_or_default(),
                None => ServiceStatus::default(),
            };
            services.push((namespace, name, spec, status));
        }
        "EndpointSlice" => {
            let here_named = what("EndpointSlice");
            let name = name.ok_or_else(|| error(here, "EndpointSlice without metadata.name"))?;
            let here = here_named;
            if object
                .api_version
                .as_deref()
                .is_some_and(|v| !v.starts_with("discovery.k8s.io/"))
            {
                return Err(error(here, "apiVersion must be discovery.k8s.io/v1"));
            }
            if object.address_type.as_deref() == Some("FQDN") {
                return Ok(());
            }
            let labels = object.metadata.labels.unwrap_or_default();
            let service = labels
                .get("kubernetes.io/service-name")
                .cloned()
                .ok_or_else(|| error(&here, "metadata.labels has no kubernetes.io/service-name"))?;
            slices.push(Slice {
                namespace,
                service,
                name,
                endpoints: object.endpoints.unwrap_or_default(),
                ports: object.ports.unwrap_or_default(),
            });
        }
        // Other kinds (Deployments, ConfigMaps...) may share a file; they are not ours.
        _ => {}
    }
    Ok(())
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

fn service(
    namespace: &str,
    name: &str,
    spec: ServiceSpec,
    status: ServiceStatus,
    slices: &[Slice],
) -> Result<Option<ServiceDoc>, ManifestError> {
    let object = format!("Service {namespace}/{name}");
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
        .map(|(i, c)| ip(c, &object, &format!("spec.clusterIPs[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut external_addresses = spec
        .external_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| ip(c, &object, &format!("spec.externalIPs[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(lb) = status.load_balancer {
        for (i, ingress) in lb.ingress.iter().enumerate() {
            if let Some(text) = &ingress.ip {
                let addr = ip(
                    text,
                    &object,
                    &format!("status.loadBalancer.ingress[{i}].ip"),
                )?;
                if !external_addresses.contains(&addr) {
                    external_addresses.push(addr);
                }
            }
        }
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => svcproxy::Protocol::Tcp,
            "UDP" => svcproxy::Protocol::Udp,
            other => {
                return Err(error(
                    &object,
                    format!("spec.ports[{i}].protocol: {other:?} is not supported (TCP or UDP)"),
                ));
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
    let (session_affinity, affinity_timeout_seconds) = match spec.session_affinity.as_deref() {
        None | Some("None") => (AffinityDoc::None, None),
        Some("ClientIP") => (
            AffinityDoc::ClientIp,
            Some(
                spec.session_affinity_config
                    .and_then(|c| c.client_ip)
                    .and_then(|c| c.timeout_seconds)
                    .unwrap_or(10_800),
            ),
        ),
        Some(other) => {
            return Err(error(
                &object,
                format!("spec.sessionAffinity: {other:?} is not None or ClientIP"),
            ));
        }
    };
    let endpoints = endpoints(slices)?;
    Ok(Some(ServiceDoc {
        name: format!("{namespace}/{name}"),
        addresses,
        external_addresses,
        ports,
        policy: PolicyDoc::RoundRobin,
        maglev_table_size: None,
        session_affinity,
        affinity_timeout_seconds,
        publish_not_ready: spec.publish_not_ready_addresses,
        internal_traffic_policy: traffic(
            spec.internal_traffic_policy.as_deref(),
            &object,
            "spec.internalTrafficPolicy",
        )?,
        external_traffic_policy: traffic(
            spec.external_traffic_policy.as_deref(),
            &object,
            "spec.externalTrafficPolicy",
        )?,
        max_connections: None,
        endpoints: Some(endpoints),
    }))
}

/// The endpoints of every slice, one per IP: an IP in several slices (with different ports)
/// gets the union of their named ports.
fn endpoints(slices: &[Slice]) -> Result<Vec<EndpointDoc>, ManifestError> {
    let mut by_ip: BTreeMap<IpAddr, EndpointDoc> = BTreeMap::new();
    for slice in slices {
        let object = format!("EndpointSlice {}/{}", slice.namespace, slice.name);
        let mut ports = BTreeMap::new();
        for (i, p) in slice.ports.iter().enumerate() {
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
                return Err(error(&object, format!("ports[{i}].name is used twice")));
            }
        }
        for (j, e) in slice.endpoints.iter().enumerate() {
            let c = e.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            for (k, address) in e.addresses.iter().enumerate() {
                let addr = ip(address, &object, &format!("endpoints[{j}].addresses[{k}]"))?;
                let entry = by_ip.entry(addr).or_insert_with(|| EndpointDoc {
                    address: addr.to_string(),
                    ports: BTreeMap::new(),
                    ready,
                    serving: Some(c.and_then(|c| c.serving).unwrap_or(ready)),
                    terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                    weight: 1,
                    node: e.node_name.clone(),
                    zone: e.zone.clone(),
                });
                entry
                    .ports
                    .extend(ports.iter().map(|(n, p)| (n.clone(), *p)));
            }
        }
    }
    Ok(by_ip.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Result<Vec<ServiceDoc>, ManifestError> {
        services(&[("test.yaml".into(), yaml.into())])
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
status:
  loadBalancer: {ingress: [{ip: 198.51.100.1}]}
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
            s.external_addresses.len(),
            2,
            "externalIPs and load-balancer ingress"
        );
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
        assert!(load(yaml).unwrap().is_empty());
    }

    #[test]
    fn bad_manifests_name_the_object_and_field() {
        let err = |yaml: &str| load(yaml).unwrap_err().to_string();
        assert_eq!(
            err(
                "kind: Service\nmetadata: {name: web}\nspec: {clusterIP: 198.18.0.300, ports: [{port: 80}]}"
            ),
            "Service default/web: spec.clusterIPs[0]: \"198.18.0.300\" is not an IP address"
        );
        assert_eq!(
            err(
                "kind: Service\nmetadata: {name: web}\nspec: {clusterIP: 198.18.0.3, ports: [{port: 80, protocol: SCTP}]}"
            ),
            "Service default/web: spec.ports[0].protocol: \"SCTP\" is not supported (TCP or UDP)"
        );
        assert_eq!(
            err(
                "kind: Service\nmetadata: {name: web}\nspec: {clusterIP: 198.18.0.3, sessionAffinity: Sticky, ports: [{port: 80}]}"
            ),
            "Service default/web: spec.sessionAffinity: \"Sticky\" is not None or ClientIP"
        );
        assert_eq!(
            err(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4"
            ),
            "EndpointSlice default/s: metadata.labels has no kubernetes.io/service-name"
        );
        assert!(
            err("kind: Service\nmetadata: {name: web}\nspec: {ports: [{port: eighty}]}")
                .starts_with("Service default/web: spec:")
        );
        assert!(err("kind: [unclosed").starts_with("test.yaml: document 1:"));
        let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, labels: {kubernetes.io/service-name: web}}\n\
                     addressType: IPv4\nendpoints: [{addresses: [198.19.0.999]}]\n---\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 198.18.0.3, ports: [{port: 80}]}";
        assert_eq!(
            err(slice),
            "EndpointSlice default/s: endpoints[0].addresses[0]: \"198.19.0.999\" is not an IP address"
        );
    }
}
