//! The UDP flow table: lookup, reverse lookup, stale ids, idle expiry, purge on publish.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

mod common;

use proptest::prelude::*;
use svcproxy_core::*;

const LISTENER: &str = "0.0.0.0:53";

fn listener() -> ServicePortKey {
    ServicePortKey::new(LISTENER.parse().unwrap(), Protocol::Udp)
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([198, 19, 0, i as u8], 5353))
}

fn dns_table(n: usize) -> Table {
    let table = Table::default();
    let s = Service::new("dns")
        .address("0.0.0.0".parse().unwrap())
        .port(ServicePort::udp(53));
    let eps = (0..n).map(|i| Endpoint::new(addr(i))).collect();
    table
        .apply(Batch::new().upsert(s).replace_endpoints("dns", eps))
        .unwrap();
    table
}

fn set_endpoints(table: &Table, which: &[usize]) {
    let eps = which.iter().map(|&i| Endpoint::new(addr(i))).collect();
    table
        .apply(Batch::new().replace_endpoints("dns", eps))
        .unwrap();
}

fn flow_key(port: u16) -> FlowKey {
    FlowKey {
        client: SocketAddr::from(([127, 0, 0, 2], port)),
        local: "127.0.0.53:53".parse().unwrap(),
    }
}

/// Starts a flow for `key` the way a backend does, with the client's port as its handle.
fn start(flows: &mut FlowTable<u16>, snap: &Snapshot, key: FlowKey, now: Instant) -> FlowId {
    flows
        .open(key, listener(), snap, now, FlowLimits::NONE, |_, _| {
            Ok::<_, Infallible>(key.client.port())
        })
        .unwrap()
        .unwrap()
}

#[test]
fn lookup_reverse_lookup_and_stale_ids() {
    let table = dns_table(2);
    let snap = table.load_full();
    let mut flows = FlowTable::new(Duration::from_secs(30));
    let now = Instant::now();
    let id = start(&mut flows, &snap, flow_key(1000), now);
    assert_eq!(flows.lookup(&flow_key(1000), now), Some(id));
    assert_eq!(flows.lookup(&flow_key(1001), now), None);
    let f = flows.get(FlowId::from_u64(id.to_u64())).unwrap();
    assert_eq!(f.key, flow_key(1000));
    assert_eq!(f.handle, 1000);
    assert_eq!(f.endpoint, addr(0));

    let stats = |t: &Table| t.load().stats()[0].totals;
    assert_eq!(stats(&table).connections_active, 1);
    let removed = flows.remove(id).unwrap();
    assert_eq!(removed.handle, 1000);
    assert_eq!(
        stats(&table).connections_active,
        1,
        "until the flow is dropped"
    );
    drop(removed);
    assert_eq!(stats(&table).connections_active, 0);
    // A new flow may reuse the slot; the old id must not find it.
    let id2 = start(&mut flows, &snap, flow_key(1002), now);
    assert!(flows.get(id).is_none());
    assert!(flows.get(id2).is_some());
    assert!(flows.remove(id).is_none());
}

#[test]
fn a_failed_handle_adds_nothing_and_counts_a_connect_error() {
    let table = dns_table(1);
    let snap = table.load();
    let mut flows: FlowTable<u16> = FlowTable::new(Duration::from_secs(30));
    let now = Instant::now();
    let r = flows.open(
        flow_key(1),
        listener(),
        &snap,
        now,
        FlowLimits::NONE,
        |_, endpoint| {
            assert_eq!(
                endpoint,
                addr(0),
                "the handle is made for the chosen endpoint"
            );
            Err("no fd")
        },
    );
    assert_eq!(r, Err((addr(0), "no fd")));
    assert!(flows.is_empty());
    let totals = table.load().stats()[0].totals;
    assert_eq!(totals.connections_total, 0);
    assert_eq!(totals.connect_errors, 1);
}

#[test]
fn opening_is_refused_without_endpoints_or_room_and_skipped_for_unknown_ports() {
    let table = dns_table(2);
    let mut flows: FlowTable<u16> = FlowTable::new(Duration::from_secs(30));
    let now = Instant::now();
    let handle = |_: FlowId, _: SocketAddr| Ok::<_, Infallible>(0);
    let counted = |t: &Table| {
        let totals = t.load().stats()[0].totals;
        (totals.refused, totals.limited)
    };
    let room = |total| FlowLimits {
        total,
        per_client: usize::MAX,
    };

    // Room for one flow: the first opens, the second is refused by the limit.
    let first = flows.open(flow_key(1), listener(), &table.load(), now, room(1), handle);
    assert!(matches!(first, Ok(Some(_))));
    let second = flows.open(flow_key(2), listener(), &table.load(), now, room(1), handle);
    assert!(matches!(second, Ok(None)));
    assert_eq!(counted(&table), (0, 1));

    // One client's share: a third port of the same client address is refused, another
    // client's first flow opens.
    let share = FlowLimits {
        total: 8,
        per_client: 2,
    };
    let mine = flows.open(flow_key(5), listener(), &table.load(), now, share, handle);
    assert!(matches!(mine, Ok(Some(_))));
    assert_eq!(flows.client_flows(flow_key(5).client.ip()), 2);
    let over = flows.open(flow_key(6), listener(), &table.load(), now, share, handle);
    assert!(matches!(over, Ok(None)));
    assert_eq!(counted(&table), (0, 2));
    let other = FlowKey {
        client: SocketAddr::from(([127, 0, 0, 3], 6)),
        ..flow_key(6)
    };
    let theirs = flows.open(other, listener(), &table.load(), now, share, handle);
    assert!(matches!(theirs, Ok(Some(_))));

    // No eligible endpoint: refused.
    set_endpoints(&table, &[]);
    let none = flows.open(flow_key(3), listener(), &table.load(), now, room(8), handle);
    assert!(matches!(none, Ok(None)));
    assert_eq!(counted(&table), (1, 2));

    // A port the table does not have: nothing to count.
    let unknown_port = ServicePortKey::new("0.0.0.0:54".parse().unwrap(), Protocol::Udp);
    let unknown = flows.open(
        flow_key(4),
        unknown_port,
        &table.load(),
        now,
        room(8),
        handle,
    );
    assert!(matches!(unknown, Ok(None)));
    assert_eq!(counted(&table), (1, 2));
    assert_eq!(flows.len(), 3);
    // Removing flows gives the client its share back.
    let ids: Vec<FlowId> = flows.iter().map(|(id, _)| id).collect();
    for id in ids {
        drop(flows.remove(id));
    }
    assert_eq!(flows.client_flows(flow_key(5).client.ip()), 0);
}

#[test]
fn idle_flows_expire_and_used_ones_stay() {
    let table = dns_table(2);
    let snap = table.load_full();
    let mut flows = FlowTable::new(Duration::from_secs(30));
    let t0 = Instant::now();
    let quiet = start(&mut flows, &snap, flow_key(1), t0);
    let busy = start(&mut flows, &snap, flow_key(2), t0);
    flows.replied(quiet, t0);
    flows.replied(busy, t0);
    flows.touch(busy, t0 + Duration::from_secs(20));
    assert!(flows.expire(t0 + Duration::from_secs(30)).is_empty());
    let gone = flows.expire(t0 + Duration::from_secs(31));
    assert_eq!(gone.iter().map(|f| f.handle).collect::<Vec<_>>(), vec![1]);
    assert!(flows.get(quiet).is_none() && flows.get(busy).is_some());
    assert_eq!(flows.lookup(&flow_key(1), t0), None);
}

#[test]
fn unreplied_flows_expire_first_and_are_evicted_oldest_first() {
    let table = dns_table(2);
    let snap = table.load_full();
    let mut flows = FlowTable::new(Duration::from_secs(30));
    let t0 = Instant::now();
    let ids: Vec<FlowId> = (1..=4)
        .map(|p| start(&mut flows, &snap, flow_key(p), t0))
        .collect();
    flows.replied(ids[0], t0);
    // A flow nothing came back on lasts UNREPLIED_TIMEOUT without datagrams, not 30 s.
    flows.touch(ids[3], t0 + UNREPLIED_TIMEOUT);
    let gone = flows.expire(t0 + UNREPLIED_TIMEOUT + Duration::from_millis(1));
    let mut handles: Vec<u16> = gone.iter().map(|f| f.handle).collect();
    handles.sort();
    assert_eq!(handles, [2, 3], "the quiet unreplied ones");
    drop(gone);
    assert!(flows.get(ids[0]).is_some() && flows.get(ids[3]).is_some());
    // At the limit, room is made from the oldest unreplied flow; replied ones stay.
    let late = start(&mut flows, &snap, flow_key(5), t0 + UNREPLIED_TIMEOUT);
    let evicted = flows.evict_oldest_unreplied().unwrap();
    assert_eq!(evicted.handle, 4, "the oldest unreplied flow left");
    drop(evicted);
    assert_eq!(flows.evict_oldest_unreplied().unwrap().handle, 5);
    assert!(
        flows.evict_oldest_unreplied().is_none(),
        "replied flows are not evicted"
    );
    assert!(flows.get(ids[0]).is_some() && flows.get(late).is_none());
    assert_eq!(table.load().stats()[0].totals.connections_active, 1);
}

#[test]
fn publishing_retires_flows_of_removed_endpoints_on_next_sync() {
    let table = dns_table(2);
    let mut flows = FlowTable::new(Duration::from_secs(30));
    let now = Instant::now();
    let snap = table.load_full();
    flows.sync(&snap, now);
    let to0 = start(&mut flows, &snap, flow_key(1), now);
    let to1 = start(&mut flows, &snap, flow_key(2), now);
    assert_eq!(flows.get(to1).unwrap().endpoint, addr(1));

    set_endpoints(&table, &[0]);
    let snap = table.load_full();
    flows.sync(&snap, now);
    assert!(!flows.get(to0).unwrap().is_retired());
    // The same client source port now reaches the live endpoint...
    assert_eq!(flows.lookup(&flow_key(2), now), None);
    let again = start(&mut flows, &snap, flow_key(2), now);
    assert_eq!(flows.get(again).unwrap().endpoint, addr(0));
    // ...while the retired flow still resolves, for replies in flight, until the grace ends.
    assert!(flows.get(to1).unwrap().is_retired());
    assert!(flows.expire(now + REPLY_GRACE / 2).is_empty());
    let gone = flows.expire(now + REPLY_GRACE);
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].endpoint, addr(1));
    assert!(flows.get(to1).is_none());
    assert_eq!(flows.lookup(&flow_key(2), now), Some(again));
    // Same generation again: nothing to do.
    flows.sync(&snap, now);
    assert!(flows.iter().all(|(_, f)| !f.is_retired()));

    // Removing the service retires everything.
    table.apply(Batch::new().remove("dns")).unwrap();
    flows.sync(&table.load(), now);
    assert_eq!(flows.lookup(&flow_key(1), now), None);
    assert_eq!(flows.expire(now + REPLY_GRACE).len(), 2);
    assert!(flows.is_empty());
}

#[test]
fn the_reply_grace_is_capped_by_the_idle_timeout() {
    let table = dns_table(1);
    let idle = REPLY_GRACE / 4;
    let mut flows = FlowTable::new(idle);
    let now = Instant::now();
    let snap = table.load_full();
    flows.sync(&snap, now);
    start(&mut flows, &snap, flow_key(1), now);
    set_endpoints(&table, &[]);
    flows.sync(&table.load(), now);
    assert_eq!(flows.expire(now + idle).len(), 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::cases(64)))]

    /// After a sync, exactly the flows whose endpoint is still eligible remain.
    #[test]
    fn purge_keeps_exactly_the_eligible(n in 1usize..8, keep in prop::collection::vec(any::<bool>(), 8), clients in 1u16..60) {
        let table = dns_table(n);
        let snap = table.load_full();
        let mut flows = FlowTable::new(Duration::from_secs(30));
        let now = Instant::now();
        for c in 0..clients {
            start(&mut flows, &snap, flow_key(1000 + c), now);
        }
        let kept: Vec<usize> = (0..n).filter(|&i| keep[i]).collect();
        let before: Vec<SocketAddr> = flows.iter().map(|(_, f)| f.endpoint).collect();
        set_endpoints(&table, &kept);
        flows.sync(&table.load(), now);
        let eligible: HashSet<SocketAddr> = kept.iter().map(|&i| addr(i)).collect();
        for c in 0..clients {
            if let Some(id) = flows.lookup(&flow_key(1000 + c), now) {
                prop_assert!(eligible.contains(&flows.get(id).unwrap().endpoint));
            }
        }
        prop_assert!(flows.iter().all(|(_, f)| f.is_retired() != eligible.contains(&f.endpoint)));
        flows.expire(now + REPLY_GRACE);
        let survivors = before.iter().filter(|e| eligible.contains(e)).count();
        prop_assert_eq!(flows.len(), survivors);
        let active = table.load().stats()[0].totals.connections_active;
        prop_assert_eq!(active as usize, survivors);
    }
}
