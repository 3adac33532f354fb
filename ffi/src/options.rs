//! The proxy's options as C sees them: one struct holding everything the Rust facade and the
//! daemon's `[proxy]` and `[node]` sections set, its defaults, and its conversion (each value
//! checked, the field named when one is wrong).

use std::ffi::c_char;
use std::time::Duration;

use svcproxy::{BackendKind, DrainPolicy, Forwarding, Options, TableConfig};

use crate::abi::{Failure, guard, optional_text, slot};
use crate::convert::{ips, nets};
use crate::svcproxy_result;

/// Backend: io_uring where available, else epoll.
pub const SVCPROXY_BACKEND_AUTO: u32 = 0;
/// Backend: epoll.
pub const SVCPROXY_BACKEND_EPOLL: u32 = 1;
/// Backend: io_uring.
pub const SVCPROXY_BACKEND_IO_URING: u32 = 2;
/// io_uring forwarding: receive into kernel-chosen buffers and send from them; streams are
/// spliced.
pub const SVCPROXY_FORWARDING_BUFFERS: u32 = 0;
/// io_uring forwarding: splice through a pipe per direction (small transfers copied), as the
/// epoll backend does.
pub const SVCPROXY_FORWARDING_SPLICE: u32 = 1;

/// Proxy options. Get the defaults from [`svcproxy_options_default`], then change fields.
/// Strings and arrays are borrowed for the call they are passed to.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct svcproxy_options {
    /// `SVCPROXY_BACKEND_*`.
    pub backend: u32,
    /// Worker threads; 0: one per CPU; at most 1024.
    pub workers: u32,
    /// Timeout of the first connect attempt, in milliseconds (doubled per further attempt):
    /// 1 to 600000.
    pub connect_timeout_ms: u32,
    /// Endpoints tried per connection: 1 to 8.
    pub connect_attempts: u32,
    /// TCP idle timeout in milliseconds (any value a `uint32_t` holds); 0: none.
    pub idle_timeout_ms: u32,
    /// UDP flow idle timeout in milliseconds: 1 to 86400000.
    pub udp_idle_timeout_ms: u32,
    /// Most TCP connections open at once: 1 to 16777216.
    pub max_connections: u32,
    /// Most TCP connections one client IP address may hold; 0: a quarter of
    /// `max_connections`. A client over it is reset and counted limited.
    pub max_connections_per_client: u32,
    /// Most UDP flows per worker: 1 to 16777216.
    pub max_udp_flows: u32,
    /// Most UDP flows one client IP address may hold per worker; 0: a quarter of
    /// `max_udp_flows`.
    pub max_udp_flows_per_client: u32,
    /// Close connections to removed endpoints after this many milliseconds (at most
    /// 86400000); 0: keep them.
    pub drain_close_after_ms: u32,
    /// `SVCPROXY_FORWARDING_*`: how the io_uring backend moves TCP bytes (the epoll backend
    /// always splices).
    pub forwarding: u32,
    /// Connect to endpoints from the client's own address, so that backends see it
    /// (`IP_TRANSPARENT`: needs CAP_NET_ADMIN, and the embedder must route the replies back to
    /// this host: the rules svcproxyd installs are in the README, "Client source
    /// preservation").
    pub preserve_client_ip: bool,
    /// This node's name (for traffic policy Local); NULL: none.
    pub node_name: *const c_char,
    /// This node's zone (for endpoints' zone hints); NULL: none.
    pub node_zone: *const c_char,
    /// Addresses node ports are served on (IP text); with `node_addresses_len` 0, every IPv4
    /// address.
    pub node_addresses: *const *const c_char,
    /// Number of `node_addresses`.
    pub node_addresses_len: usize,
    /// The cluster's pod and node networks (CIDR text, e.g. "198.18.0.0/16"): clients there
    /// are inside the cluster and reach every endpoint of a service whose external traffic
    /// policy is Local.
    pub cluster_cidrs: *const *const c_char,
    /// Number of `cluster_cidrs`.
    pub cluster_cidrs_len: usize,
}

/// Writes the default options into `out`.
#[unsafe(no_mangle)]
pub extern "C" fn svcproxy_options_default(out: *mut svcproxy_options) -> svcproxy_result {
    guard(std::ptr::null_mut(), 0, || {
        let out = slot(out, "out")?;
        let d = Options::default().config;
        *out = svcproxy_options {
            backend: SVCPROXY_BACKEND_AUTO,
            workers: 0,
            connect_timeout_ms: d.tcp.connect_timeout.as_millis() as u32,
            connect_attempts: d.tcp.connect_attempts,
            idle_timeout_ms: d.tcp.idle_timeout.map_or(0, |t| t.as_millis() as u32),
            udp_idle_timeout_ms: d.udp_idle_timeout.as_millis() as u32,
            max_connections: d.max_connections as u32,
            max_connections_per_client: d.max_connections_per_client as u32,
            max_udp_flows: d.max_udp_flows as u32,
            max_udp_flows_per_client: d.max_udp_flows_per_client as u32,
            drain_close_after_ms: 0,
            forwarding: match d.io_uring.forwarding {
                Forwarding::Buffers => SVCPROXY_FORWARDING_BUFFERS,
                Forwarding::Splice => SVCPROXY_FORWARDING_SPLICE,
            },
            preserve_client_ip: d.preserve_client_ip,
            node_name: std::ptr::null(),
            node_zone: std::ptr::null(),
            node_addresses: std::ptr::null(),
            node_addresses_len: 0,
            cluster_cidrs: std::ptr::null(),
            cluster_cidrs_len: 0,
        };
        Ok(())
    })
}

/// The facade's options and the table's configuration from `o`, or the first field that is
/// wrong.
pub(crate) fn options_from(o: &svcproxy_options) -> Result<(Options, TableConfig), Failure> {
    let invalid = |m: String| Failure::new(svcproxy_result::Invalid, m);
    let backend = match o.backend {
        SVCPROXY_BACKEND_AUTO => BackendKind::Auto,
        SVCPROXY_BACKEND_EPOLL => BackendKind::Epoll,
        SVCPROXY_BACKEND_IO_URING => BackendKind::IoUring,
        other => {
            return Err(invalid(format!(
                "options.backend is {other}, must be 0, 1 or 2"
            )));
        }
    };
    let mut options = Options {
        backend,
        ..Options::default()
    };
    let c = &mut options.config;
    c.workers = o.workers as usize;
    c.tcp.connect_timeout = Duration::from_millis(u64::from(o.connect_timeout_ms));
    c.tcp.connect_attempts = o.connect_attempts;
    c.tcp.idle_timeout =
        (o.idle_timeout_ms > 0).then(|| Duration::from_millis(u64::from(o.idle_timeout_ms)));
    c.udp_idle_timeout = Duration::from_millis(u64::from(o.udp_idle_timeout_ms));
    c.max_connections = o.max_connections as usize;
    c.max_connections_per_client = o.max_connections_per_client as usize;
    c.max_udp_flows = o.max_udp_flows as usize;
    c.max_udp_flows_per_client = o.max_udp_flows_per_client as usize;
    c.tcp.drain = match o.drain_close_after_ms {
        0 => DrainPolicy::Keep,
        ms => DrainPolicy::CloseAfter(Duration::from_millis(u64::from(ms))),
    };
    c.io_uring.forwarding = match o.forwarding {
        SVCPROXY_FORWARDING_BUFFERS => Forwarding::Buffers,
        SVCPROXY_FORWARDING_SPLICE => Forwarding::Splice,
        other => {
            return Err(invalid(format!(
                "options.forwarding is {other}, must be 0 or 1"
            )));
        }
    };
    c.preserve_client_ip = o.preserve_client_ip;
    c.validate().map_err(|e| invalid(format!("options: {e}")))?;
    let defaults = TableConfig::default();
    let table = TableConfig {
        node_name: optional_text(o.node_name, "options.node_name")?.map(str::to_string),
        node_zone: optional_text(o.node_zone, "options.node_zone")?.map(str::to_string),
        node_addresses: match o.node_addresses_len {
            0 => defaults.node_addresses,
            n => ips(o.node_addresses, n, "options.node_addresses")?,
        },
        cluster_ranges: nets(
            o.cluster_cidrs,
            o.cluster_cidrs_len,
            "options.cluster_cidrs",
        )?,
    };
    Ok((options, table))
}
