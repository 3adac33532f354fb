//! The status page (`GET /` on the metrics address), as HAProxy's stats page is for HAProxy:
//! one self-contained HTML page (no external assets) that reads `GET /status.json` every two
//! seconds and shows every service port with its endpoints and their conditions, connection
//! and byte rates (from the change between two reads), errors, the table generation and the
//! last reload.

use std::net::{IpAddr, SocketAddr};

use serde_json::{Value, json};
use svcproxy::{Proxy, Snapshot};

/// The page.
pub const PAGE: &str = include_str!("status.html");

/// What the page shows, read now: the table, its counters, and the outcome of the last
/// reload (`reloads` attempted, the last one's error if it was rejected).
pub fn json(snapshot: &Snapshot, proxy: &Proxy, reloads: u64, reload_error: Option<&str>) -> Value {
    let ports: Vec<Value> = proxy
        .stats()
        .iter()
        .map(|s| {
            let declared = snapshot.service(&s.service).map(|e| e.endpoints());
            let endpoints: Vec<Value> = s
                .endpoints
                .iter()
                .map(|(address, counters)| {
                    json!({
                        "address": address.to_string(),
                        "conditions": declared
                            .and_then(|eps| conditions(eps, *address)),
                        "counters": counters,
                    })
                })
                .collect();
            json!({
                "service": s.service,
                "port": s.port,
                "protocol": s.protocol.to_string(),
                "totals": s.totals,
                "endpoints": endpoints,
            })
        })
        .collect();
    json!({
        "generation": snapshot.generation(),
        "services": snapshot.service_count(),
        "openConnections": proxy.connections(),
        "backend": format!("{:?}", proxy.backend()),
        "reloads": reloads,
        "lastReloadError": reload_error,
        "ports": ports,
    })
}

/// The conditions of the declared endpoint a resolved backend address belongs to (its IP, and
/// its port when the endpoint names one).
fn conditions(declared: &[svcproxy::core::Endpoint], backend: SocketAddr) -> Option<Value> {
    let ip: IpAddr = backend.ip();
    declared
        .iter()
        .find(|e| {
            e.address.ip() == ip && (e.address.port() == 0 || e.address.port() == backend.port())
        })
        .map(|e| {
            json!({
                "ready": e.conditions.ready,
                "serving": e.conditions.serving,
                "terminating": e.conditions.terminating,
            })
        })
}
