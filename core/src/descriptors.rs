//! The descriptor budget: the process's descriptor limit split between what uses descriptors,
//! so that no kind of use can starve the others (a flood of UDP flows, one socket each, must
//! not leave TCP, the listeners or the admin endpoint without descriptors).
//!
//! Of a limit of L: a reserve of L/8 (at least 64) for listeners, the workers' own
//! descriptors (epoll or ring, wakers, pipe pools) and the embedding program (an admin
//! endpoint, config files); of the rest, a quarter for UDP flows (split between the workers)
//! and three quarters for TCP connections, each taking `per_connection` descriptors. The
//! configured limits apply when they are lower.

use crate::config::ProxyConfig;

/// How a descriptor limit is split; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorBudget {
    /// The descriptor limit.
    pub limit: u64,
    /// Kept for listeners, the workers' own descriptors and the embedding program.
    pub reserve: u64,
    /// TCP connections that fit, over all workers.
    pub max_connections: usize,
    /// UDP flows that fit, per worker.
    pub max_udp_flows: usize,
}

impl DescriptorBudget {
    /// The split of `limit` descriptors for `workers` workers whose TCP connections take
    /// `per_connection` descriptors each.
    pub fn new(limit: u64, workers: usize, per_connection: u64) -> Self {
        let reserve = (limit / 8).max(64).min(limit);
        let rest = limit - reserve;
        let udp = rest / 4;
        let tcp = (rest - udp) / per_connection.max(1);
        let per_worker = udp / (workers.max(1) as u64);
        Self {
            limit,
            reserve,
            max_connections: usize::try_from(tcp).unwrap_or(usize::MAX).max(1),
            max_udp_flows: usize::try_from(per_worker).unwrap_or(usize::MAX).max(1),
        }
    }

    /// Lowers `config`'s connection and flow limits to what fits; returns whether it did.
    pub fn fit(&self, config: &mut ProxyConfig) -> bool {
        let before = (config.max_connections, config.max_udp_flows);
        config.max_connections = config.max_connections.min(self.max_connections);
        config.max_udp_flows = config.max_udp_flows.min(self.max_udp_flows);
        before != (config.max_connections, config.max_udp_flows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_split_and_configured_limits_only_lowered() {
        let b = DescriptorBudget::new(20_000, 2, 2);
        assert_eq!(b.reserve, 2_500);
        assert_eq!(b.max_udp_flows, 2_187, "a quarter of 17,500, per worker");
        assert_eq!(
            b.max_connections, 6_562,
            "three quarters of 17,500, two each"
        );
        let mut config = ProxyConfig::default();
        assert!(b.fit(&mut config));
        assert_eq!(
            (config.max_connections, config.max_udp_flows),
            (6_562, 2_187)
        );
        config.max_connections = 10;
        assert!(!b.fit(&mut config), "a lower limit stays");
        assert_eq!(config.max_connections, 10);
        let tiny = DescriptorBudget::new(16, 4, 6);
        assert_eq!(tiny.reserve, 16);
        assert_eq!((tiny.max_connections, tiny.max_udp_flows), (1, 1));
    }
}
