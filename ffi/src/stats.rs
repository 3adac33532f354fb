//! Statistics into caller-provided memory: fixed-size structs for C, or a JSON document.

use std::ffi::c_char;

use svcproxy::core::CounterValues;
use svcproxy::{PortStats, Protocol};

use crate::abi::{Failure, Outcome, fill, guard, maybe_write, object, out_array};
use crate::convert::{SVCPROXY_PROTOCOL_TCP, SVCPROXY_PROTOCOL_UDP};
use crate::{svcproxy_proxy, svcproxy_result};

/// Counters of a service port or an endpoint. The counts of clients refused by a limit and
/// of connections or flows evicted are in the JSON form only (`svcproxy_proxy_stats_json`),
/// so that this struct keeps its layout.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct svcproxy_counters {
    /// Connections (TCP) or flows (UDP) ever opened.
    pub connections_total: u64,
    /// Connections or flows open now.
    pub connections_active: u64,
    /// Bytes from clients to backends.
    pub bytes_in: u64,
    /// Bytes from backends to clients.
    pub bytes_out: u64,
    /// Failed connection attempts.
    pub connect_errors: u64,
    /// Clients refused for lack of an endpoint.
    pub refused: u64,
    /// Datagrams from clients.
    pub datagrams_in: u64,
    /// Datagrams to clients.
    pub datagrams_out: u64,
}

/// Statistics of one service port.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct svcproxy_port_stats {
    /// Service name (NUL-terminated, truncated to 255 bytes).
    pub service: [c_char; 256],
    /// Port name, or its number when unnamed.
    pub port: [c_char; 64],
    /// `SVCPROXY_PROTOCOL_*`.
    pub protocol: u32,
    /// Endpoints with counters (see `svcproxy_proxy_endpoint_stats`).
    pub endpoints: u32,
    /// Totals.
    pub totals: svcproxy_counters,
}

/// Statistics of one endpoint of one service port.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct svcproxy_endpoint_stats {
    /// Service name.
    pub service: [c_char; 256],
    /// Port name, or its number when unnamed.
    pub port: [c_char; 64],
    /// `SVCPROXY_PROTOCOL_*`.
    pub protocol: u32,
    /// Backend address, "ip:port".
    pub address: [c_char; 64],
    /// Counters.
    pub counters: svcproxy_counters,
}

fn counters(v: &CounterValues) -> svcproxy_counters {
    svcproxy_counters {
        connections_total: v.connections_total,
        connections_active: v.connections_active,
        bytes_in: v.bytes_in,
        bytes_out: v.bytes_out,
        connect_errors: v.connect_errors,
        refused: v.refused,
        datagrams_in: v.datagrams_in,
        datagrams_out: v.datagrams_out,
    }
}

fn protocol(p: Protocol) -> u32 {
    match p {
        Protocol::Tcp => SVCPROXY_PROTOCOL_TCP,
        Protocol::Udp => SVCPROXY_PROTOCOL_UDP,
    }
}

/// The running proxy's counters (with what socket-level load balancing counted), else the
/// table's.
fn all(proxy: *const svcproxy_proxy) -> Result<Vec<PortStats>, Failure> {
    let p = object(proxy, "proxy")?;
    Ok(match crate::lock(p).as_ref() {
        Some(running) => running.stats(),
        None => p.table.load().stats(),
    })
}

/// Writes up to `items` entries into `out`; `count` gets how many there are. `Buffer` if
/// they did not all fit.
fn write_all<T>(items: Vec<T>, out: &mut [T], count: *mut usize) -> Outcome {
    let n = items.len();
    maybe_write(count, n);
    for (slot, item) in out.iter_mut().zip(items) {
        *slot = item;
    }
    if n > out.len() {
        return Err(Failure::new(
            svcproxy_result::Buffer,
            format!("{n} entries, room for {}", out.len()),
        ));
    }
    Ok(())
}

/// Writes the statistics of every service port into `out` (room for `capacity`); `count`
/// (may be NULL) gets the number of service ports. Returns `SVCPROXY_RESULT_BUFFER` (after
/// writing what fits) when `capacity` is too small.
#[unsafe(no_mangle)]
pub extern "C" fn svcproxy_proxy_port_stats(
    proxy: *const svcproxy_proxy,
    out: *mut svcproxy_port_stats,
    capacity: usize,
    count: *mut usize,
    err: *mut c_char,
    err_len: usize,
) -> svcproxy_result {
    guard(err, err_len, || {
        let stats = all(proxy)?;
        let out = out_array(out, capacity, "out")?;
        let items = stats
            .iter()
            .map(|s| {
                let mut item = svcproxy_port_stats {
                    service: [0; 256],
                    port: [0; 64],
                    protocol: protocol(s.protocol),
                    endpoints: s.endpoints.len() as u32,
                    totals: counters(&s.totals),
                };
                fill(&mut item.service, &s.service);
                fill(&mut item.port, &s.port);
                item
            })
            .collect();
        write_all(items, out, count)
    })
}

/// Writes the statistics of every endpoint of every service port into `out`, as
/// [`svcproxy_proxy_port_stats`] does for service ports.
#[unsafe(no_mangle)]
pub extern "C" fn svcproxy_proxy_endpoint_stats(
    proxy: *const svcproxy_proxy,
    out: *mut svcproxy_endpoint_stats,
    capacity: usize,
    count: *mut usize,
    err: *mut c_char,
    err_len: usize,
) -> svcproxy_result {
    guard(err, err_len, || {
        let stats = all(proxy)?;
        let out = out_array(out, capacity, "out")?;
        let items = stats
            .iter()
            .flat_map(|s| {
                s.endpoints.iter().map(move |(addr, v)| {
                    let mut item = svcproxy_endpoint_stats {
                        service: [0; 256],
                        port: [0; 64],
                        protocol: protocol(s.protocol),
                        address: [0; 64],
                        counters: counters(v),
                    };
                    fill(&mut item.service, &s.service);
                    fill(&mut item.port, &s.port);
                    fill(&mut item.address, &addr.to_string());
                    item
                })
            })
            .collect();
        write_all(items, out, count)
    })
}

/// Writes every counter as JSON (`{"ports": [{"service", "port", "protocol", "totals",
/// "endpoints": [{"address", ...counters}]}]}`) into `buf`, as
/// [`svcproxy_proxy_table_json`](crate::svcproxy_proxy_table_json) does.
#[unsafe(no_mangle)]
pub extern "C" fn svcproxy_proxy_stats_json(
    proxy: *const svcproxy_proxy,
    buf: *mut c_char,
    capacity: usize,
    needed: *mut usize,
    err: *mut c_char,
    err_len: usize,
) -> svcproxy_result {
    guard(err, err_len, || {
        let ports: Vec<serde_json::Value> = all(proxy)?
            .iter()
            .map(|s| {
                let endpoints: Vec<serde_json::Value> = s
                    .endpoints
                    .iter()
                    .map(|(a, v)| serde_json::json!({"address": a.to_string(), "counters": v}))
                    .collect();
                serde_json::json!({
                    "service": s.service, "port": s.port, "protocol": s.protocol.to_string(),
                    "totals": s.totals, "endpoints": endpoints,
                })
            })
            .collect();
        let json = serde_json::json!({ "ports": ports }).to_string();
        write_string(&json, buf, capacity, needed)
    })
}

/// Writes `s` NUL-terminated into `buf` of `capacity` bytes; `needed` gets the size required.
pub(crate) fn write_string(
    s: &str,
    buf: *mut c_char,
    capacity: usize,
    needed: *mut usize,
) -> Outcome {
    maybe_write(needed, s.len() + 1);
    let out = out_array(buf, capacity, "buf")?;
    if out.len() < s.len() + 1 {
        return Err(Failure::new(
            svcproxy_result::Buffer,
            format!("{} bytes needed, {} given", s.len() + 1, out.len()),
        ));
    }
    for (d, b) in out.iter_mut().zip(s.as_bytes()) {
        *d = *b as c_char;
    }
    out[s.len()] = 0;
    Ok(())
}
