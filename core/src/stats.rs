//! Traffic counters per service port and per endpoint.
//!
//! Counters are relaxed atomics: updating one never locks and never allocates, and a reader
//! sees each counter exactly, though not all of them at one instant ("consistent enough":
//! `bytes` and `connections` may be a few events apart). A [`Tally`] updates the service port's
//! and the endpoint's counters together, and is what a connection or UDP flow holds.
//!
//! Counters outlive table publishes: an endpoint that stays in a service keeps its counters.

use std::net::SocketAddr;

use crate::loom::sync::atomic::{AtomicU64, Ordering};
use crate::model::Protocol;
use std::sync::Arc;

/// The live counters of one service port or one endpoint.
#[derive(Debug, Default)]
pub struct Counters {
    connections_total: AtomicU64,
    connections_active: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    connect_errors: AtomicU64,
    refused: AtomicU64,
    limited: AtomicU64,
    evicted: AtomicU64,
    datagrams_in: AtomicU64,
    datagrams_out: AtomicU64,
}

/// The values of [`Counters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct CounterValues {
    /// Connections (TCP) or flows (UDP) ever opened.
    pub connections_total: u64,
    /// Connections or flows open now.
    pub connections_active: u64,
    /// Bytes from clients to backends.
    pub bytes_in: u64,
    /// Bytes from backends to clients.
    pub bytes_out: u64,
    /// Failed connection attempts to backends.
    pub connect_errors: u64,
    /// Clients refused because no endpoint was eligible (service port counters only).
    pub refused: u64,
    /// Clients (or their first datagrams) refused by a limit: the flow table full, or one
    /// client over its share (service port counters only).
    pub limited: u64,
    /// Closed to make room at a limit: TCP connections idle longest, UDP flows on which no
    /// reply had come back.
    pub evicted: u64,
    /// Datagrams from clients to backends.
    pub datagrams_in: u64,
    /// Datagrams from backends to clients.
    pub datagrams_out: u64,
}

impl std::ops::AddAssign for CounterValues {
    fn add_assign(&mut self, o: Self) {
        self.connections_total += o.connections_total;
        self.connections_active += o.connections_active;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.connect_errors += o.connect_errors;
        self.refused += o.refused;
        self.limited += o.limited;
        self.evicted += o.evicted;
        self.datagrams_in += o.datagrams_in;
        self.datagrams_out += o.datagrams_out;
    }
}

impl Counters {
    /// Fresh zeroed counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Connections or flows open now.
    #[inline]
    pub fn active(&self) -> u64 {
        self.connections_active.load(Ordering::Relaxed)
    }

    /// Counts a client refused for lack of an endpoint.
    #[inline]
    pub fn add_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a client refused by a limit.
    #[inline]
    pub fn add_limited(&self) {
        self.limited.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `v` (counted by another process that handed over; see
    /// [`crate::handover`]) to every counter but the open connections, which stay that
    /// process's.
    pub fn carry(&self, v: &CounterValues) {
        let add = |c: &AtomicU64, n: u64| {
            c.fetch_add(n, Ordering::Relaxed);
        };
        add(&self.connections_total, v.connections_total);
        add(&self.bytes_in, v.bytes_in);
        add(&self.bytes_out, v.bytes_out);
        add(&self.connect_errors, v.connect_errors);
        add(&self.refused, v.refused);
        add(&self.limited, v.limited);
        add(&self.evicted, v.evicted);
        add(&self.datagrams_in, v.datagrams_in);
        add(&self.datagrams_out, v.datagrams_out);
    }

    /// Reads every counter.
    pub fn values(&self) -> CounterValues {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterValues {
            connections_total: get(&self.connections_total),
            connections_active: get(&self.connections_active),
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
            connect_errors: get(&self.connect_errors),
            refused: get(&self.refused),
            limited: get(&self.limited),
            evicted: get(&self.evicted),
            datagrams_in: get(&self.datagrams_in),
            datagrams_out: get(&self.datagrams_out),
        }
    }
}

/// The counters one connection or flow updates: its service port's and its endpoint's.
#[derive(Debug, Clone)]
pub struct Tally {
    port: Arc<Counters>,
    endpoint: Arc<Counters>,
}

impl Tally {
    pub(crate) fn new(port: Arc<Counters>, endpoint: Arc<Counters>) -> Self {
        Self { port, endpoint }
    }

    /// Connections or flows open now to the endpoint.
    #[inline]
    pub fn endpoint_active(&self) -> u64 {
        self.endpoint.active()
    }

    /// Counts a connection or flow opened to the endpoint, until the returned [`Opened`] is
    /// dropped. Call it as soon as the endpoint is chosen, so that least-connections sees
    /// attempts in flight.
    #[inline]
    pub fn open(&self) -> Opened {
        for c in [&self.port, &self.endpoint] {
            c.connections_total.fetch_add(1, Ordering::Relaxed);
            c.connections_active.fetch_add(1, Ordering::Relaxed);
        }
        Opened(self.clone())
    }

    /// Counts a flow another process opened (and counted; see [`crate::handover`]) as open
    /// here, until the returned [`Opened`] is dropped.
    #[inline]
    pub fn carry_on(&self) -> Opened {
        for c in [&self.port, &self.endpoint] {
            c.connections_active.fetch_add(1, Ordering::Relaxed);
        }
        Opened(self.clone())
    }

    /// Counts a connection or flow to the endpoint evicted to make room.
    #[inline]
    pub fn evicted(&self) {
        for c in [&self.port, &self.endpoint] {
            c.evicted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a failed connection attempt to the endpoint.
    #[inline]
    pub fn connect_error(&self) {
        for c in [&self.port, &self.endpoint] {
            c.connect_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts bytes from the client to the endpoint.
    #[inline]
    pub fn bytes_in(&self, n: u64) {
        for c in [&self.port, &self.endpoint] {
            c.bytes_in.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts bytes from the endpoint to the client.
    #[inline]
    pub fn bytes_out(&self, n: u64) {
        for c in [&self.port, &self.endpoint] {
            c.bytes_out.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts `n` datagrams of `bytes` bytes in all from the client to the endpoint.
    #[inline]
    pub fn datagrams_in(&self, n: u64, bytes: u64) {
        for c in [&self.port, &self.endpoint] {
            c.datagrams_in.fetch_add(n, Ordering::Relaxed);
            c.bytes_in.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Counts `n` datagrams of `bytes` bytes in all from the endpoint to the client.
    #[inline]
    pub fn datagrams_out(&self, n: u64, bytes: u64) {
        for c in [&self.port, &self.endpoint] {
            c.datagrams_out.fetch_add(n, Ordering::Relaxed);
            c.bytes_out.fetch_add(bytes, Ordering::Relaxed);
        }
    }
}

/// A connection or flow counted open by [`Tally::open`]; dropping it counts it closed, so a
/// worker that fails and unwinds leaves no connection counted open. Its counters are the
/// [`Tally`] it derefs to.
#[derive(Debug)]
pub struct Opened(Tally);

impl std::ops::Deref for Opened {
    type Target = Tally;

    fn deref(&self) -> &Tally {
        &self.0
    }
}

impl Drop for Opened {
    #[inline]
    fn drop(&mut self) {
        for c in [&self.0.port, &self.0.endpoint] {
            c.connections_active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Statistics of one service port, summed over its frontends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortStats {
    /// Service name.
    pub service: String,
    /// Port name, or its number when unnamed.
    pub port: String,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Totals for the service port.
    pub totals: CounterValues,
    /// Per endpoint (resolved backend address), sorted by address.
    pub endpoints: Vec<(SocketAddr, CounterValues)>,
}
