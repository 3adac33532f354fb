//! Proxy settings shared by every backend: worker count, timeouts, limits and buffer sizes.

use std::ops::RangeInclusive;
use std::time::Duration;

use crate::session::{TcpPolicy, check_duration};
use crate::steering::Steering;

/// The range of [`ProxyConfig::udp_idle_timeout`]: 1 ms to 1 day.
pub const UDP_IDLE_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(86_400);

/// How a proxy runs. Validate with [`ProxyConfig::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Worker threads; 0 means one per CPU.
    pub workers: usize,
    /// TCP timeouts, connect attempts and drain policy.
    pub tcp: TcpPolicy,
    /// UDP flows without a datagram either way for this long are closed
    /// ([`UDP_IDLE_TIMEOUT_RANGE`]).
    pub udp_idle_timeout: Duration,
    /// Most TCP connections open at once, over all workers; clients beyond it wait in the
    /// accept queue.
    pub max_connections: usize,
    /// Most TCP connections one client IP address may hold, over all workers; 0: a quarter
    /// of `max_connections` (see
    /// [`ProxyConfig::connections_per_client`]). A client over it is reset and counted
    /// limited.
    pub max_connections_per_client: usize,
    /// Most UDP flows per worker; datagrams that would start more are dropped (after the
    /// oldest flow no reply came back on is evicted, if there is one).
    pub max_udp_flows: usize,
    /// Most UDP flows one client IP address may hold per worker; 0: a quarter of
    /// `max_udp_flows` (see [`ProxyConfig::udp_flows_per_client`]), so that one source
    /// flooding from many ports cannot take every flow.
    pub max_udp_flows_per_client: usize,
    /// TCP accept queue length per listener.
    pub listen_backlog: u32,
    /// Size of each splice pipe (the kernel rounds it to pages).
    pub pipe_size: usize,
    /// Datagrams received or sent per system call.
    pub udp_batch: usize,
    /// Connect to backends from the client's own address (`IP_TRANSPARENT`; needs
    /// CAP_NET_ADMIN and policy routing for the replies, see the daemon docs).
    pub preserve_client_ip: bool,
    /// Serve service addresses through transparent listeners at this port instead of a
    /// listener per frontend (see [`crate::steering`]; needs CAP_NET_ADMIN, and packets
    /// steered there: svcproxyd's capture does it).
    pub transparent_port: Option<u16>,
    /// Settings of the io_uring backend.
    pub io_uring: IoUringConfig,
}

/// How the io_uring backend moves TCP bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Forwarding {
    /// Receive into buffers the kernel picks from a provided-buffer ring, send from them; one
    /// send in flight per direction (the design of liburing's `examples/proxy.c`).
    #[default]
    Buffers,
    /// Readiness from ring polls, then splice(2) through a pipe per direction for streams and
    /// a copy for small transfers, as the epoll backend forwards (not `IORING_OP_SPLICE`,
    /// which io_uring runs on io-wq threads).
    Splice,
}

/// Settings of the io_uring backend (ignored by the others).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoUringConfig {
    /// TCP forwarding mode.
    pub forwarding: Forwarding,
    /// Let a kernel thread poll the submission queue (`IORING_SETUP_SQPOLL`).
    pub sqpoll: bool,
    /// Provided buffers per worker for TCP (a power of two, up to 32768).
    pub buffers: u16,
    /// Size of each TCP buffer in bytes.
    pub buffer_size: u32,
    /// Submission queue entries per worker (a power of two).
    pub entries: u32,
}

impl Default for IoUringConfig {
    fn default() -> Self {
        Self {
            forwarding: Forwarding::Buffers,
            sqpoll: false,
            buffers: 256,
            buffer_size: 64 << 10,
            entries: 1024,
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            workers: 0,
            tcp: TcpPolicy::default(),
            udp_idle_timeout: Duration::from_secs(30),
            max_connections: 1 << 20,
            max_connections_per_client: 0,
            max_udp_flows: 1 << 16,
            max_udp_flows_per_client: 0,
            listen_backlog: 4096,
            pipe_size: 256 << 10,
            udp_batch: 32,
            preserve_client_ip: false,
            transparent_port: None,
            io_uring: IoUringConfig::default(),
        }
    }
}

impl ProxyConfig {
    /// Checks every value; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        self.tcp.validate().map_err(|e| format!("tcp.{e}"))?;
        let checks: [(&str, u64, u64, u64); 8] = [
            ("workers", self.workers as u64, 0, 1024),
            ("max_connections", self.max_connections as u64, 1, 1 << 24),
            (
                "max_connections_per_client",
                self.max_connections_per_client as u64,
                0,
                1 << 24,
            ),
            ("max_udp_flows", self.max_udp_flows as u64, 1, 1 << 24),
            (
                "max_udp_flows_per_client",
                self.max_udp_flows_per_client as u64,
                0,
                1 << 24,
            ),
            ("listen_backlog", u64::from(self.listen_backlog), 1, 1 << 20),
            ("pipe_size", self.pipe_size as u64, 4096, 64 << 20),
            ("udp_batch", self.udp_batch as u64, 1, 64),
        ];
        for (field, got, min, max) in checks {
            if !(min..=max).contains(&got) {
                return Err(format!("{field} is {got}, must be between {min} and {max}"));
            }
        }
        if self.transparent_port == Some(0) {
            return Err("transparent_port is 0, must be between 1 and 65535".into());
        }
        check_duration(
            "udp_idle_timeout",
            self.udp_idle_timeout,
            UDP_IDLE_TIMEOUT_RANGE,
        )?;
        let u = &self.io_uring;
        if !u.buffers.is_power_of_two() || u.buffers > 1 << 15 {
            return Err(format!(
                "io_uring.buffers is {}, must be a power of two up to 32768",
                u.buffers
            ));
        }
        if !(4096..=1 << 20).contains(&u.buffer_size) {
            return Err(format!(
                "io_uring.buffer_size is {}, must be between 4096 and 1048576",
                u.buffer_size
            ));
        }
        if !u.entries.is_power_of_two() || !(64..=32768).contains(&u.entries) {
            return Err(format!(
                "io_uring.entries is {}, must be a power of two from 64 to 32768",
                u.entries
            ));
        }
        Ok(())
    }

    /// The connections one client IP address may hold, over all workers:
    /// `max_connections_per_client`, or a quarter of `max_connections` (at least one) when it
    /// is 0; never more than `max_connections`.
    pub fn connections_per_client(&self) -> usize {
        match self.max_connections_per_client {
            0 => (self.max_connections / 4).max(1),
            n => n.min(self.max_connections),
        }
    }

    /// The flows one client IP address may hold per worker: `max_udp_flows_per_client`, or a
    /// quarter of `max_udp_flows` (at least one) when it is 0; never more than `max_udp_flows`.
    pub fn udp_flows_per_client(&self) -> usize {
        match self.max_udp_flows_per_client {
            0 => (self.max_udp_flows / 4).max(1),
            n => n.min(self.max_udp_flows),
        }
    }

    /// Which frontends transparent listeners serve, when [`ProxyConfig::transparent_port`] is
    /// set.
    pub fn steering(&self) -> Option<Steering> {
        self.transparent_port.map(Steering::new)
    }

    /// Worker threads to start: `workers`, or the CPU count when 0.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::DrainPolicy;

    #[test]
    fn every_duration_has_a_range() {
        assert_eq!(ProxyConfig::default().validate(), Ok(()));
        let with = |f: fn(&mut ProxyConfig)| {
            let mut c = ProxyConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert_eq!(
            with(|c| c.tcp.drain = DrainPolicy::CloseAfter(Duration::MAX)),
            format!(
                "tcp.drain is {:?}, must be between 0ns and 86400s",
                Duration::MAX
            )
        );
        assert!(
            with(|c| c.tcp.idle_timeout = Some(Duration::MAX)).starts_with("tcp.idle_timeout is")
        );
        assert!(
            with(|c| c.tcp.connect_timeout = Duration::ZERO)
                .starts_with("tcp.connect_timeout is 0ns")
        );
        assert!(with(|c| c.udp_idle_timeout = Duration::MAX).starts_with("udp_idle_timeout is"));
    }
}
