//! The `/metrics` exposition, in the OpenMetrics text format (encoded by prometheus-client).
//!
//! - kube-proxy's series under kube-proxy's names, so that its dashboards and alerts work:
//!   `kubeproxy_sync_proxy_rules_duration_seconds` (a histogram of the time each table change
//!   took to publish), `kubeproxy_network_programming_duration_seconds` (from the
//!   EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time` to the publication of
//!   the endpoints it changed), `kubeproxy_sync_proxy_rules_last_timestamp_seconds`, and
//!   `kubeproxy_sync_proxy_rules_service_changes_total` / `_endpoint_changes_total` with their
//!   `_pending` gauges (changes published and not yet applied by every worker), and
//!   `kubeproxy_sync_proxy_rules_no_local_endpoints_total` (services whose internal or external
//!   traffic policy is Local and that have no ready endpoint on this node).
//! - svcproxy's own, `svcproxy_*`: per service port and per endpoint traffic counters (their
//!   labels are the table's: one series per service port and endpoint), the table, open
//!   connections, the descriptor budget, and each worker's restarts and state. Per-endpoint
//!   series stop at [`MAX_ENDPOINT_SERIES`] endpoints per family (the per service port ones
//!   always cover every endpoint); `svcproxy_endpoint_series_omitted` says how many were left
//!   out, so a huge table cannot make a scrape huge.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use svcproxy::core::CounterValues;
use svcproxy::core::TrafficPolicy;
use svcproxy::{PortStats, Proxy, Snapshot, WorkerHealth};

/// Endpoints given series of their own per family, at most.
pub const MAX_ENDPOINT_SERIES: usize = 10_000;

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A series family read from a `T`; counters are named without `_total`, which the encoder
/// adds.
struct Metric<T> {
    name: &'static str,
    kind: MetricType,
    help: &'static str,
    value: fn(&T) -> u64,
}

const WORKER_METRICS: [Metric<WorkerHealth>; 2] = [
    Metric {
        name: "worker_restarts",
        kind: MetricType::Counter,
        help: "Times a worker was restarted after it failed.",
        value: |w| w.restarts,
    },
    Metric {
        name: "worker_up",
        kind: MetricType::Gauge,
        help: "Whether a worker serves (0: given up on after failing again and again).",
        value: |w| u64::from(!w.down),
    },
];

const METRICS: [Metric<CounterValues>; 10] = [
    Metric {
        name: "connections",
        kind: MetricType::Counter,
        help: "Connections (TCP) or flows (UDP) opened.",
        value: |v| v.connections_total,
    },
    Metric {
        name: "connections_active",
        kind: MetricType::Gauge,
        help: "Connections or flows open now.",
        value: |v| v.connections_active,
    },
    Metric {
        name: "bytes_in",
        kind: MetricType::Counter,
        help: "Bytes from clients to endpoints.",
        value: |v| v.bytes_in,
    },
    Metric {
        name: "bytes_out",
        kind: MetricType::Counter,
        help: "Bytes from endpoints to clients.",
        value: |v| v.bytes_out,
    },
    Metric {
        name: "connect_errors",
        kind: MetricType::Counter,
        help: "Failed connection attempts to endpoints.",
        value: |v| v.connect_errors,
    },
    Metric {
        name: "refused",
        kind: MetricType::Counter,
        help: "Clients refused for lack of an eligible endpoint.",
        value: |v| v.refused,
    },
    Metric {
        name: "limited",
        kind: MetricType::Counter,
        help: "Clients refused by a limit: the UDP flow table full, or one client address over its share.",
        value: |v| v.limited,
    },
    Metric {
        name: "evicted",
        kind: MetricType::Counter,
        help: "Closed to make room at a limit: TCP connections idle longest, UDP flows never answered.",
        value: |v| v.evicted,
    },
    Metric {
        name: "datagrams_in",
        kind: MetricType::Counter,
        help: "Datagrams from clients.",
        value: |v| v.datagrams_in,
    },
    Metric {
        name: "datagrams_out",
        kind: MetricType::Counter,
        help: "Datagrams to clients.",
        value: |v| v.datagrams_out,
    },
];

/// kube-proxy's sync series, fed as table changes are published; clones share them.
#[derive(Debug, Clone)]
pub struct SyncMetrics {
    duration: Histogram,
    programming: Histogram,
    last: Gauge<f64, AtomicU64>,
    service_changes: Counter,
    endpoint_changes: Counter,
    /// From a Kubernetes API event's arrival to the publication of what it changed.
    event_to_table: Histogram,
    /// From a Kubernetes API event's arrival to every worker serving what it changed.
    event_to_workers: Histogram,
    /// Objects a source left out, by source and why.
    skipped: Family<Vec<(&'static str, &'static str)>, Gauge>,
}

impl Default for SyncMetrics {
    fn default() -> Self {
        Self {
            // 10 us to about 5 s.
            duration: Histogram::new(exponential_buckets(1e-5, 2.0, 20)),
            // 1 ms to about 9 minutes.
            programming: Histogram::new(exponential_buckets(1e-3, 2.0, 20)),
            last: Gauge::default(),
            service_changes: Counter::default(),
            endpoint_changes: Counter::default(),
            // 10 us to about 5 s.
            event_to_table: Histogram::new(exponential_buckets(1e-5, 2.0, 20)),
            event_to_workers: Histogram::new(exponential_buckets(1e-5, 2.0, 20)),
            skipped: Family::default(),
        }
    }
}

impl SyncMetrics {
    /// A table change was published at `at`, in `took`, carrying `changes`.
    pub fn published(&self, took: Duration, at: SystemTime, changes: Changes) {
        self.duration.observe(took.as_secs_f64());
        self.last.set(seconds(at));
        self.service_changes.inc_by(changes.services);
        self.endpoint_changes.inc_by(changes.endpoints);
    }

    /// An endpoint change triggered at `triggered` (its EndpointSlice's trigger-time
    /// annotation) was published at `at`.
    pub fn programmed(&self, triggered: SystemTime, at: SystemTime) {
        let latency = at.duration_since(triggered).unwrap_or_default();
        self.programming.observe(latency.as_secs_f64());
    }

    /// What API events that arrived `took` ago is published.
    pub fn api_published(&self, took: Duration) {
        self.event_to_table.observe(took.as_secs_f64());
    }

    /// What API events that arrived `took` before is applied by every worker.
    pub fn api_applied(&self, took: Duration) {
        self.event_to_workers.observe(took.as_secs_f64());
    }

    /// `source` (its name) leaves out `invalid` objects it cannot use and `not_served` that
    /// it does not serve.
    pub fn skipped(&self, source: &'static str, invalid: usize, not_served: usize) {
        for (reason, n) in [("invalid", invalid), ("not_served", not_served)] {
            let labels = vec![("source", source), ("reason", reason)];
            self.skipped.get_or_create(&labels).set(n as i64);
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "svcproxy_api_event_to_table_seconds",
            "Time from a Kubernetes API watch event's arrival to the publication of what it changed",
            self.event_to_table.clone(),
        );
        registry.register(
            "svcproxy_api_event_to_workers_seconds",
            "Time from a Kubernetes API watch event's arrival to every worker serving what it changed (at most the next generation's when generations follow closely)",
            self.event_to_workers.clone(),
        );
        registry.register(
            "svcproxy_objects_skipped",
            "Objects a source leaves out: invalid (cannot be used, an error names the field) or not_served (SCTP, FQDN, other kinds)",
            self.skipped.clone(),
        );
        let sync = "kubeproxy_sync_proxy_rules";
        registry.register(
            format!("{sync}_duration_seconds"),
            "Time a table change took to publish (kube-proxy: to sync its rules)",
            self.duration.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "Time from an endpoint change's trigger (the EndpointSlice's last-change-trigger-time) to its publication",
            self.programming.clone(),
        );
        registry.register(
            format!("{sync}_last_timestamp_seconds"),
            "When the last table change was published, in seconds since the epoch",
            self.last.clone(),
        );
        registry.register(
            format!("{sync}_service_changes"),
            "Service definitions published (added, changed or removed)",
            self.service_changes.clone(),
        );
        registry.register(
            format!("{sync}_endpoint_changes"),
            "Endpoint sets published",
            self.endpoint_changes.clone(),
        );
    }
}

/// How many service and endpoint changes a table change carried, or wait to be applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    /// Service definitions added, changed or removed.
    pub services: u64,
    /// Endpoint sets replaced.
    pub endpoints: u64,
}

impl std::ops::AddAssign for Changes {
    fn add_assign(&mut self, o: Self) {
        self.services += o.services;
        self.endpoints += o.endpoints;
    }
}

fn seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What one scrape reads of the table and the proxy.
#[derive(Debug)]
struct Scrape {
    stats: Vec<PortStats>,
    workers: Vec<WorkerHealth>,
    pending: Changes,
    /// Services with policy Local and no local endpoint: internal, external.
    no_local: [u64; 2],
    gauges: Vec<(&'static str, &'static str, u64)>,
    publish_seconds: f64,
}

/// Endpoints of `stats` past [`MAX_ENDPOINT_SERIES`], left without series of their own.
fn omitted(stats: &[PortStats]) -> u64 {
    let endpoints: usize = stats.iter().map(|s| s.endpoints.len()).sum();
    endpoints.saturating_sub(MAX_ENDPOINT_SERIES) as u64
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, value) in [
            (
                "kubeproxy_sync_proxy_rules_service_changes_pending",
                "Service changes published and not yet applied by every worker.",
                self.pending.services,
            ),
            (
                "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                "Endpoint changes published and not yet applied by every worker.",
                self.pending.endpoints,
            ),
        ]
        .into_iter()
        .chain(self.gauges.iter().copied())
        {
            let metric =
                encoder.encode_descriptor(name, sentence(help), None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(metric)?;
        }
        let mut family = encoder.encode_descriptor(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Services with traffic policy Local and no ready endpoint on this node",
            None,
            MetricType::Gauge,
        )?;
        for (policy, n) in ["internal", "external"].into_iter().zip(self.no_local) {
            let labels = [("traffic_policy", policy)];
            ConstGauge::new(n).encode(family.encode_family(&labels)?)?;
        }
        let metric = encoder.encode_descriptor(
            "svcproxy_table_publish_seconds",
            "Time the last table change took to publish",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.publish_seconds).encode(metric)?;
        for m in &METRICS {
            let name = format!("svcproxy_{}", m.name);
            let help = format!("{} Per service port", m.help);
            let mut family = encoder.encode_descriptor(&name, &help, None, m.kind)?;
            for s in &self.stats {
                let labels = port_labels(s);
                encode(family.encode_family(&labels)?, m.kind, (m.value)(&s.totals))?;
            }
            let name = format!("svcproxy_endpoint_{}", m.name);
            let help = format!("{} Per endpoint", m.help);
            let mut family = encoder.encode_descriptor(&name, &help, None, m.kind)?;
            let endpoints = self
                .stats
                .iter()
                .flat_map(|s| s.endpoints.iter().map(move |e| (s, e)));
            for (s, (addr, v)) in endpoints.take(MAX_ENDPOINT_SERIES) {
                let mut labels = port_labels(s);
                labels.push(("endpoint", addr.to_string()));
                encode(family.encode_family(&labels)?, m.kind, (m.value)(v))?;
            }
        }
        for m in &WORKER_METRICS {
            let name = format!("svcproxy_{}", m.name);
            let mut family = encoder.encode_descriptor(&name, sentence(m.help), None, m.kind)?;
            for (i, w) in self.workers.iter().enumerate() {
                let labels = [("worker", i.to_string())];
                encode(family.encode_family(&labels)?, m.kind, (m.value)(w))?;
            }
        }
        Ok(())
    }
}

/// The services of `snapshot` whose internal and whose external traffic policy is Local and
/// that have no ready endpoint on `node`.
fn no_local_endpoints(snapshot: &Snapshot, node: Option<&str>) -> [u64; 2] {
    let mut counts = [0; 2];
    for s in snapshot.services() {
        let local = s
            .endpoints()
            .iter()
            .any(|e| e.conditions.ready && node.is_some() && e.node.as_deref() == node);
        let spec = s.spec();
        for (count, policy) in counts
            .iter_mut()
            .zip([spec.internal_traffic_policy, spec.external_traffic_policy])
        {
            if policy == TrafficPolicy::Local && !local {
                *count += 1;
            }
        }
    }
    counts
}

/// `help` without its final period, which the encoder adds.
fn sentence(help: &str) -> &str {
    help.strip_suffix('.').unwrap_or(help)
}

fn port_labels(s: &PortStats) -> Vec<(&'static str, String)> {
    vec![
        ("service", s.service.clone()),
        ("port", s.port.clone()),
        ("protocol", s.protocol.to_string()),
    ]
}

fn encode(
    metric: prometheus_client::encoding::MetricEncoder,
    kind: MetricType,
    value: u64,
) -> Result<(), std::fmt::Error> {
    match kind {
        MetricType::Counter => ConstCounter::new(value).encode(metric),
        _ => ConstGauge::new(value).encode(metric),
    }
}

/// The exposition of `snapshot` and `proxy` on node `node`: kube-proxy's sync series from
/// `sync` (with `pending` changes), and svcproxy's own (the last publish took
/// `publish_seconds`).
pub fn render(
    snapshot: &Snapshot,
    node: Option<&str>,
    publish_seconds: f64,
    proxy: &Proxy,
    sync: &SyncMetrics,
    pending: Changes,
) -> String {
    let budget = proxy.descriptor_budget();
    let config = proxy.config();
    let stats = proxy.stats();
    let scrape = Scrape {
        workers: proxy.workers(),
        pending,
        no_local: no_local_endpoints(snapshot, node),
        gauges: vec![
            (
                "svcproxy_table_generation",
                "Generation of the published service table.",
                snapshot.generation(),
            ),
            (
                "svcproxy_endpoint_series_omitted",
                "Endpoints left without per-endpoint series (past the limit; their service port's series count them).",
                omitted(&stats),
            ),
            (
                "svcproxy_table_services",
                "Services in the table.",
                snapshot.service_count() as u64,
            ),
            (
                "svcproxy_open_connections",
                "TCP connections open now, over all services.",
                proxy.connections() as u64,
            ),
            (
                "svcproxy_descriptor_limit",
                "The process's descriptor limit (RLIMIT_NOFILE) at start.",
                budget.limit,
            ),
            (
                "svcproxy_descriptor_reserve",
                "Descriptors kept for listeners, the workers and the HTTP endpoints.",
                budget.reserve,
            ),
            (
                "svcproxy_max_connections",
                "TCP connections served at once, over all workers (the setting, or what the descriptors allow).",
                config.max_connections as u64,
            ),
            (
                "svcproxy_max_udp_flows",
                "UDP flows per worker (the setting, or what the descriptors allow).",
                config.max_udp_flows as u64,
            ),
        ],
        publish_seconds,
        stats,
    };
    let mut registry = Registry::default();
    sync.register(&mut registry);
    registry.register_collector(Box::new(scrape));
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn endpoint_series_stop_at_the_limit_and_say_how_many_were_left_out() {
        let endpoints: Vec<(SocketAddr, CounterValues)> = (0..MAX_ENDPOINT_SERIES + 5)
            .map(|i| {
                let addr = SocketAddr::from(([127, 1, (i / 256) as u8, (i % 256) as u8], 80));
                (addr, CounterValues::default())
            })
            .collect();
        let stats = vec![PortStats {
            service: "default/big".into(),
            port: "80".into(),
            protocol: svcproxy::Protocol::Tcp,
            totals: CounterValues::default(),
            endpoints,
        }];
        assert_eq!(omitted(&stats), 5);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape {
            stats,
            workers: Vec::new(),
            pending: Changes::default(),
            no_local: [0; 2],
            gauges: Vec::new(),
            publish_seconds: 0.0,
        }));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        let series = |prefix: &str| out.lines().filter(|l| l.starts_with(prefix)).count();
        assert_eq!(
            series("svcproxy_endpoint_connections_total{"),
            MAX_ENDPOINT_SERIES
        );
        assert_eq!(series("svcproxy_connections_total{"), 1);
    }
}
