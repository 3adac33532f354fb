//! Transparent listeners: many frontends, a few sockets.
//!
//! With one listener per frontend per worker, descriptors grow as frontends x workers. When
//! [`ProxyConfig::transparent_port`](crate::ProxyConfig::transparent_port) is set, every
//! *steered* frontend (one whose address is neither a wildcard nor a loopback address: the
//! service addresses that svcproxyd captures) is served instead by the worker's transparent
//! listeners, one per address family and protocol, bound with `IP_TRANSPARENT` to the
//! loopback address of their family at that port. Something outside the proxy must steer the
//! frontends' packets there: svcproxyd's capture does it with nftables `tproxy` rules, whose
//! element set is [`Snapshot::steered_frontends`](crate::Snapshot::steered_frontends).
//!
//! The frontend of a steered client is its destination: the accepted socket's local address
//! (TCP), or each datagram's original destination (`IP_RECVORIGDSTADDR`, UDP). UDP replies
//! must leave from the service address *and port*, so a worker opens a listener on a UDP
//! frontend while it has flows to it (at most one per flow), and closes it once it has none.
//! Descriptors are then O(workers + connections + flows), whatever the number of services.
//!
//! Wildcard and loopback frontends keep a listener each.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::model::ServicePortKey;

/// Which frontends transparent listeners serve, and where those listen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Steering {
    port: u16,
}

impl Steering {
    /// Transparent listeners at `port` of the loopback addresses.
    pub const fn new(port: u16) -> Self {
        Self { port }
    }

    /// Whether `key` is served by a transparent listener: its address is neither a wildcard
    /// nor a loopback address.
    pub fn steers(&self, key: &ServicePortKey) -> bool {
        steerable(key.addr.ip())
    }

    /// Where steered packets of the family of `v6` are delivered (`tproxy ... to` this).
    pub fn listen_addr(&self, v6: bool) -> SocketAddr {
        let ip = if v6 {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        } else {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        };
        SocketAddr::new(ip, self.port)
    }

    /// The transparent listener that serves the steered frontend `key`.
    pub fn listener_for(&self, key: &ServicePortKey) -> ServicePortKey {
        ServicePortKey::new(self.listen_addr(key.addr.is_ipv6()), key.protocol)
    }

    /// Whether `key` is one of the transparent listeners.
    pub fn is_listener(&self, key: &ServicePortKey) -> bool {
        key.addr == self.listen_addr(key.addr.is_ipv6())
    }
}

/// Whether frontends at `ip` can be steered (and svcproxyd captures `ip`): neither a wildcard
/// nor a loopback address.
pub fn steerable(ip: IpAddr) -> bool {
    !ip.is_unspecified() && !ip.is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn key(s: &str, protocol: Protocol) -> ServicePortKey {
        ServicePortKey::new(s.parse().unwrap(), protocol)
    }

    #[test]
    fn service_addresses_are_steered_to_the_loopback_listener_of_their_family() {
        let s = Steering::new(10263);
        let v4 = key("198.18.0.10:80", Protocol::Tcp);
        let v6 = key("[2001:db8::10]:53", Protocol::Udp);
        assert!(s.steers(&v4) && s.steers(&v6));
        assert_eq!(s.listener_for(&v4), key("127.0.0.1:10263", Protocol::Tcp));
        assert_eq!(s.listener_for(&v6), key("[::1]:10263", Protocol::Udp));
        assert!(s.is_listener(&s.listener_for(&v6)));
        assert!(!s.is_listener(&v4));
        for kept in [
            "0.0.0.0:30080",
            "[::]:30080",
            "127.0.0.1:8080",
            "[::1]:8080",
        ] {
            assert!(!s.steers(&key(kept, Protocol::Tcp)), "{kept}");
        }
    }
}
