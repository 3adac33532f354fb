//! Where the benchmark runs.
//!
//! - Loopback (any user): client, proxies and backends share the host's loopback; backends on
//!   127.0.0.2 and 127.0.0.3, proxies on 127.0.0.1. Kernel DNAT is not measured.
//! - Namespaces (root): a client namespace and a backend namespace joined by a veth pair,
//!   addresses from 198.18.0.0/15: client side 198.18.0.1 (where the proxies listen), backends
//!   198.18.0.2 and 198.18.0.3, and 198.19.0.10 as the virtual IP that kernel DNAT rewrites.
//!   Everything is removed when the topology is dropped.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

pub const NS_CLIENT: &str = "svcbench-client";
pub const NS_BACKEND: &str = "svcbench-backend";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Loopback,
    Namespaces,
}

#[derive(Debug)]
pub struct Topology {
    pub mode: Mode,
    /// Where proxies listen.
    pub proxy_ip: IpAddr,
    /// Where the backends listen (one backend per address).
    pub backend_ips: Vec<IpAddr>,
    /// The virtual IP of kernel DNAT (namespaces only).
    pub vip: Option<IpAddr>,
}

fn ip(args: &[&str]) -> io::Result<()> {
    run("ip", args)
}

pub fn run(cmd: &str, args: &[&str]) -> io::Result<()> {
    let out = Command::new(cmd).args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Topology {
    pub fn loopback() -> Self {
        Self {
            mode: Mode::Loopback,
            proxy_ip: Ipv4Addr::new(127, 0, 0, 1).into(),
            backend_ips: vec![
                Ipv4Addr::new(127, 0, 0, 2).into(),
                Ipv4Addr::new(127, 0, 0, 3).into(),
            ],
            vip: None,
        }
    }

    pub fn namespaces() -> io::Result<Self> {
        // Leftovers of an interrupted run.
        let _ = ip(&["netns", "del", NS_CLIENT]);
        let _ = ip(&["netns", "del", NS_BACKEND]);
        let topo = Self {
            mode: Mode::Namespaces,
            proxy_ip: Ipv4Addr::new(198, 18, 0, 1).into(),
            backend_ips: vec![
                Ipv4Addr::new(198, 18, 0, 2).into(),
                Ipv4Addr::new(198, 18, 0, 3).into(),
            ],
            vip: Some(Ipv4Addr::new(198, 19, 0, 10).into()),
        };
        ip(&["netns", "add", NS_CLIENT])?;
        ip(&["netns", "add", NS_BACKEND])?;
        let steps: &[&[&str]] = &[
            &[
                "link", "add", "svcb-c", "netns", NS_CLIENT, "type", "veth", "peer", "name",
                "svcb-b", "netns", NS_BACKEND,
            ],
            &[
                "-n",
                NS_CLIENT,
                "addr",
                "add",
                "198.18.0.1/24",
                "dev",
                "svcb-c",
            ],
            &[
                "-n",
                NS_BACKEND,
                "addr",
                "add",
                "198.18.0.2/24",
                "dev",
                "svcb-b",
            ],
            &[
                "-n",
                NS_BACKEND,
                "addr",
                "add",
                "198.18.0.3/24",
                "dev",
                "svcb-b",
            ],
            &["-n", NS_CLIENT, "link", "set", "lo", "up"],
            &["-n", NS_BACKEND, "link", "set", "lo", "up"],
            &["-n", NS_CLIENT, "link", "set", "svcb-c", "up"],
            &["-n", NS_BACKEND, "link", "set", "svcb-b", "up"],
            &[
                "-n",
                NS_CLIENT,
                "route",
                "add",
                "198.19.0.0/16",
                "dev",
                "svcb-c",
            ],
        ];
        for step in steps {
            ip(step)?;
        }
        // Many short connections in a row: let TIME_WAIT ports be reused and widen the range
        // (above the service ports 8000-8003),
        // so a candidate measured later does not inherit an earlier one's TIME_WAIT backlog.
        for ns in [NS_CLIENT, NS_BACKEND] {
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv4.tcp_tw_reuse=1",
                    "net.ipv4.ip_local_port_range=10000 65535",
                ],
            )?;
        }
        Ok(topo)
    }

    /// The namespace of the client side (and of the proxies), if any.
    pub fn client_ns(&self) -> Option<&'static str> {
        (self.mode == Mode::Namespaces).then_some(NS_CLIENT)
    }

    /// The namespace of the backends, if any.
    pub fn backend_ns(&self) -> Option<&'static str> {
        (self.mode == Mode::Namespaces).then_some(NS_BACKEND)
    }

    /// A command that runs `program` in the client namespace.
    pub fn command_in_client(&self, program: &str) -> Command {
        match self.client_ns() {
            // nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup v2 mount
            // (the socket-lb candidate attaches there).
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}")).arg(program);
                c
            }
            None => Command::new(program),
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if self.mode == Mode::Namespaces {
            let _ = ip(&["netns", "del", NS_CLIENT]);
            let _ = ip(&["netns", "del", NS_BACKEND]);
        }
    }
}

/// Moves the calling thread into network namespace `ns` (threads it spawns inherit it).
pub fn enter(ns: Option<&str>) -> io::Result<()> {
    if let Some(ns) = ns {
        let file = File::open(format!("/var/run/netns/{ns}"))?;
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&file),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )?;
    }
    Ok(())
}
