//! Prometheus text exposition of the proxy's counters.

use std::fmt::Write;

use svcproxy::core::CounterValues;
use svcproxy::{PortStats, Proxy, Snapshot, WorkerHealth};

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Metric<T> {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&T) -> u64,
}

const WORKER_METRICS: [Metric<WorkerHealth>; 2] = [
    Metric {
        name: "worker_restarts_total",
        kind: "counter",
        help: "Times a worker was restarted after it failed.",
        value: |w| w.restarts,
    },
    Metric {
        name: "worker_up",
        kind: "gauge",
        help: "Whether a worker serves (0: given up on after failing again and again).",
        value: |w| u64::from(!w.down),
    },
];

const METRICS: [Metric<CounterValues>; 10] = [
    Metric {
        name: "connections_total",
        kind: "counter",
        help: "Connections (TCP) or flows (UDP) opened.",
        value: |v| v.connections_total,
    },
    Metric {
        name: "connections_active",
        kind: "gauge",
        help: "Connections or flows open now.",
        value: |v| v.connections_active,
    },
    Metric {
        name: "bytes_in_total",
        kind: "counter",
        help: "Bytes from clients to endpoints.",
        value: |v| v.bytes_in,
    },
    Metric {
        name: "bytes_out_total",
        kind: "counter",
        help: "Bytes from endpoints to clients.",
        value: |v| v.bytes_out,
    },
    Metric {
        name: "connect_errors_total",
        kind: "counter",
        help: "Failed connection attempts to endpoints.",
        value: |v| v.connect_errors,
    },
    Metric {
        name: "refused_total",
        kind: "counter",
        help: "Clients refused for lack of an eligible endpoint.",
        value: |v| v.refused,
    },
    Metric {
        name: "limited_total",
        kind: "counter",
        help: "Clients refused by a limit: the UDP flow table full, or one client address over its share.",
        value: |v| v.limited,
    },
    Metric {
        name: "evicted_total",
        kind: "counter",
        help: "Closed to make room at a limit: TCP connections idle longest, UDP flows never answered.",
        value: |v| v.evicted,
    },
    Metric {
        name: "datagrams_in_total",
        kind: "counter",
        help: "Datagrams from clients.",
        value: |v| v.datagrams_in,
    },
    Metric {
        name: "datagrams_out_total",
        kind: "counter",
        help: "Datagrams to clients.",
        value: |v| v.datagrams_out,
    },
];

/// The exposition: per service port and per endpoint counters, table generation, last
/// publish latency, open connections, the descriptor budget and each worker's restarts and
/// state.
pub fn render(snapshot: &Snapshot, publish_seconds: f64, proxy: &Proxy) -> String {
    let connections = proxy.connections();
    let workers = proxy.workers();
    let stats: Vec<PortStats> = snapshot.stats();
    let mut out = String::new();
    for m in &METRICS {
        let _ = writeln!(
            out,
            "# HELP svcproxy_{} {} Per service port.",
            m.name, m.help
        );
        let _ = writeln!(out, "# TYPE svcproxy_{} {}", m.name, m.kind);
        for s in &stats {
            let _ = writeln!(
                out,
                "svcproxy_{}{{service=\"{}\",port=\"{}\",protocol=\"{}\"}} {}",
                m.name,
                escape(&s.service),
                escape(&s.port),
                s.protocol,
                (m.value)(&s.totals)
            );
        }
        let _ = writeln!(
            out,
            "# HELP svcproxy_endpoint_{} {} Per endpoint.",
            m.name, m.help
        );
        let _ = writeln!(out, "# TYPE svcproxy_endpoint_{} {}", m.name, m.kind);
        for s in &stats {
            for (addr, v) in &s.endpoints {
                let _ = writeln!(
                    out,
                    "svcproxy_endpoint_{}{{service=\"{}\",port=\"{}\",protocol=\"{}\",endpoint=\"{}\"}} {}",
                    m.name,
                    escape(&s.service),
                    escape(&s.port),
                    s.protocol,
                    addr,
                    (m.value)(v)
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP svcproxy_table_generation Generation of the published service table."
    );
    let _ = writeln!(out, "# TYPE svcproxy_table_generation gauge");
    let _ = writeln!(out, "svcproxy_table_generation {}", snapshot.generation());
    let _ = writeln!(
        out,
        "# HELP svcproxy_table_publish_seconds Time the last table change took to publish."
    );
    let _ = writeln!(out, "# TYPE svcproxy_table_publish_seconds gauge");
    let _ = writeln!(out, "svcproxy_table_publish_seconds {publish_seconds}");
    let _ = writeln!(out, "# HELP svcproxy_table_services Services in the table.");
    let _ = writeln!(out, "# TYPE svcproxy_table_services gauge");
    let _ = writeln!(out, "svcproxy_table_services {}", snapshot.service_count());
    let _ = writeln!(
        out,
        "# HELP svcproxy_open_connections TCP connections open now, over all services."
    );
    let _ = writeln!(out, "# TYPE svcproxy_open_connections gauge");
    let _ = writeln!(out, "svcproxy_open_connections {connections}");
    let budget = proxy.descriptor_budget();
    let config = proxy.config();
    for (name, help, value) in [
        (
            "descriptor_limit",
            "The process's descriptor limit (RLIMIT_NOFILE) at start.",
            budget.limit,
        ),
        (
            "descriptor_reserve",
            "Descriptors kept for listeners, the workers and the admin endpoint.",
            budget.reserve,
        ),
        (
            "max_connections",
            "TCP connections served at once, over all workers (the setting, or what the descriptors allow).",
            config.max_connections as u64,
        ),
        (
            "max_udp_flows",
            "UDP flows per worker (the setting, or what the descriptors allow).",
            config.max_udp_flows as u64,
        ),
    ] {
        let _ = writeln!(out, "# HELP svcproxy_{name} {help}");
        let _ = writeln!(out, "# TYPE svcproxy_{name} gauge");
        let _ = writeln!(out, "svcproxy_{name} {value}");
    }
    for m in &WORKER_METRICS {
        let _ = writeln!(out, "# HELP svcproxy_{} {}", m.name, m.help);
        let _ = writeln!(out, "# TYPE svcproxy_{} {}", m.name, m.kind);
        for (i, w) in workers.iter().enumerate() {
            let _ = writeln!(
                out,
                "svcproxy_{}{{worker=\"{i}\"}} {}",
                m.name,
                (m.value)(w)
            );
        }
    }
    out
}
