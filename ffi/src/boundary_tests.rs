//! The C ABI called from Rust the way C calls it: raw pointers to C strings, arrays of them,
//! caller-owned structs and buffers, handles. These run under Miri in CI, which checks every
//! read and write the boundary makes through a caller's pointer (and that handles are freed
//! once). Nothing here starts workers (Miri runs no sockets).

use std::ffi::{CStr, CString, c_char};
use std::ptr::{null, null_mut};

use crate::convert::{
    SVCPROXY_POLICY_WEIGHTED_ROUND_ROBIN, SVCPROXY_PROTOCOL_TCP, SVCPROXY_TRAFFIC_CLUSTER,
    SVCPROXY_TRAFFIC_LOCAL,
};
use crate::stats::svcproxy_proxy_endpoint_stats;
use crate::*;

/// C strings that live as long as the value, and the array of their pointers.
struct CStrings {
    _owned: Vec<CString>,
    ptrs: Vec<*const c_char>,
}

impl CStrings {
    fn new(items: &[&str]) -> Self {
        let owned: Vec<CString> = items.iter().map(|s| CString::new(*s).unwrap()).collect();
        let ptrs = owned.iter().map(|s| s.as_ptr()).collect();
        Self {
            _owned: owned,
            ptrs,
        }
    }
}

fn text(buf: &[c_char]) -> &str {
    // SAFETY: the library NUL-terminates what it writes into `buf`, within `buf`.
    unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap()
}

fn new_proxy(options: &svcproxy_options) -> Result<*mut svcproxy_proxy, String> {
    let mut proxy = null_mut();
    let mut err = [0 as c_char; 256];
    match svcproxy_proxy_new(options, &mut proxy, err.as_mut_ptr(), err.len()) {
        svcproxy_result::Ok => Ok(proxy),
        _ => Err(text(&err).to_string()),
    }
}

#[test]
fn options_with_arrays_and_strings_are_read_and_bad_ones_named() {
    let mut o = std::mem::MaybeUninit::<svcproxy_options>::uninit();
    assert_eq!(
        svcproxy_options_default(o.as_mut_ptr()),
        svcproxy_result::Ok
    );
    // SAFETY: svcproxy_options_default wrote every field.
    let mut o = unsafe { o.assume_init() };
    assert_eq!(svcproxy_options_default(null_mut()), svcproxy_result::Null);

    let name = CString::new("node-a").unwrap();
    let zone = CString::new("zone-a").unwrap();
    let addresses = CStrings::new(&["127.0.0.3", "::1"]);
    let cidrs = CStrings::new(&["198.18.0.0/15", "2001:db8::/32"]);
    o.node_name = name.as_ptr();
    o.node_zone = zone.as_ptr();
    o.node_addresses = addresses.ptrs.as_ptr();
    o.node_addresses_len = addresses.ptrs.len();
    o.cluster_cidrs = cidrs.ptrs.as_ptr();
    o.cluster_cidrs_len = cidrs.ptrs.len();
    let proxy = new_proxy(&o).unwrap();
    svcproxy_proxy_free(proxy);

    // A non-ASCII value in the error text, cut at every buffer size: always terminated, and
    // never inside a character.
    let bad = CStrings::new(&["127.0.0.1", "nœud"]);
    o.node_addresses = bad.ptrs.as_ptr();
    let whole = new_proxy(&o).unwrap_err();
    assert!(whole.contains("options.node_addresses[1]"), "{whole}");
    for len in 1..whole.len() + 2 {
        let mut err = vec![0x55 as c_char; len];
        let mut proxy = null_mut();
        assert_eq!(
            svcproxy_proxy_new(&o, &mut proxy, err.as_mut_ptr(), len),
            svcproxy_result::Invalid
        );
        let got = text(&err);
        assert!(whole.starts_with(got) && got.len() < len, "{len}: {got:?}");
    }
    // An array that is NULL but has a length.
    o.node_addresses = null();
    assert!(
        new_proxy(&o)
            .unwrap_err()
            .contains("options.node_addresses")
    );
}

#[test]
fn services_endpoints_batches_and_json_cross_the_boundary() {
    let mut o = std::mem::MaybeUninit::<svcproxy_options>::uninit();
    svcproxy_options_default(o.as_mut_ptr());
    // SAFETY: svcproxy_options_default wrote every field.
    let proxy = new_proxy(&unsafe { o.assume_init() }).unwrap();
    let mut err = [0 as c_char; 256];
    let (e, n) = (err.as_mut_ptr(), err.len());

    let mut batch = null_mut();
    assert_eq!(svcproxy_batch_new(&mut batch), svcproxy_result::Ok);
    let name = CString::new("miri/web").unwrap();
    let port_name = CString::new("http").unwrap();
    let addresses = CStrings::new(&["127.0.0.1"]);
    let lb = CStrings::new(&["127.0.0.9"]);
    let ranges = CStrings::new(&["127.0.0.0/8"]);
    let ports = [svcproxy_port {
        name: port_name.as_ptr(),
        protocol: SVCPROXY_PROTOCOL_TCP,
        port: 80,
        target_port: 0,
        target_port_name: port_name.as_ptr(),
        node_port: 0,
    }];
    let service = svcproxy_service {
        name: name.as_ptr(),
        addresses: addresses.ptrs.as_ptr(),
        addresses_len: 1,
        external_addresses: null(),
        external_addresses_len: 0,
        ports: ports.as_ptr(),
        ports_len: 1,
        policy: SVCPROXY_POLICY_WEIGHTED_ROUND_ROBIN,
        maglev_table_size: 0,
        affinity_timeout_s: 30,
        publish_not_ready: false,
        internal_traffic_policy: SVCPROXY_TRAFFIC_CLUSTER,
        external_traffic_policy: SVCPROXY_TRAFFIC_LOCAL,
        max_connections: 0,
        load_balancer_addresses: lb.ptrs.as_ptr(),
        load_balancer_addresses_len: 1,
        load_balancer_source_ranges: ranges.ptrs.as_ptr(),
        load_balancer_source_ranges_len: 1,
        health_check_node_port: 30999,
    };
    assert_eq!(
        svcproxy_batch_upsert_service(batch, &service, e, n),
        svcproxy_result::Ok
    );
    let address = CString::new("127.0.0.2").unwrap();
    let zones = CStrings::new(&["zone-a"]);
    let named = [svcproxy_named_port {
        name: port_name.as_ptr(),
        port: 8080,
    }];
    let endpoints = [svcproxy_endpoint {
        address: address.as_ptr(),
        ports: named.as_ptr(),
        ports_len: 1,
        ready: true,
        serving: true,
        terminating: false,
        weight: 1,
        node: null(),
        zone: zones.ptrs[0],
        for_zones: zones.ptrs.as_ptr(),
        for_zones_len: 1,
        for_nodes: null(),
        for_nodes_len: 0,
    }];
    assert_eq!(
        svcproxy_batch_replace_endpoints(batch, name.as_ptr(), endpoints.as_ptr(), 1, e, n),
        svcproxy_result::Ok
    );
    let mut generation = 0;
    assert_eq!(
        svcproxy_proxy_apply(proxy, batch, &mut generation, e, n),
        svcproxy_result::Ok,
        "{}",
        text(&err)
    );
    assert_eq!(generation, 1);
    svcproxy_batch_free(batch);
    svcproxy_batch_free(null_mut());

    // The table as JSON: the size first, then a buffer one byte short, then one that fits.
    let mut needed = 0;
    assert_eq!(
        svcproxy_proxy_table_json(proxy, null_mut(), 0, &mut needed, e, n),
        svcproxy_result::Buffer
    );
    let mut short = vec![0 as c_char; needed - 1];
    assert_eq!(
        svcproxy_proxy_table_json(proxy, short.as_mut_ptr(), short.len(), null_mut(), e, n),
        svcproxy_result::Buffer
    );
    let mut doc = vec![0 as c_char; needed];
    assert_eq!(
        svcproxy_proxy_table_json(proxy, doc.as_mut_ptr(), doc.len(), null_mut(), e, n),
        svcproxy_result::Ok
    );
    let doc = text(&doc);
    for part in [
        "\"miri/web\"",
        "\"load_balancer_source_ranges\":[\"127.0.0.0/8\"]",
        "\"for_zones\":[\"zone-a\"]",
        "\"http\":8080",
    ] {
        assert!(doc.contains(part), "{part} in {doc}");
    }

    // Statistics into caller arrays: too small (the count still written), then enough.
    let mut count = 0;
    assert_eq!(
        svcproxy_proxy_endpoint_stats(proxy, null_mut(), 0, &mut count, e, n),
        svcproxy_result::Buffer
    );
    assert_eq!(count, 1);
    let mut stats = std::mem::MaybeUninit::<svcproxy_endpoint_stats>::uninit();
    assert_eq!(
        svcproxy_proxy_endpoint_stats(proxy, stats.as_mut_ptr(), 1, &mut count, e, n),
        svcproxy_result::Ok
    );
    // SAFETY: one entry was written.
    let stats = unsafe { stats.assume_init() };
    assert_eq!(text(&stats.service), "miri/web");
    assert_eq!(text(&stats.address), "127.0.0.2:8080");

    let bad = CString::new("{\"remove\": [\"miri/ghost\"]}").unwrap();
    assert_eq!(
        svcproxy_proxy_apply_json(proxy, bad.as_ptr(), null_mut(), e, n),
        svcproxy_result::UnknownService
    );
    assert!(text(&err).contains("miri/ghost"));
    svcproxy_proxy_free(proxy);
    svcproxy_proxy_free(null_mut());
}
