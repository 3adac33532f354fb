//! Cluster IP capture (as root): every service address is put on a dummy interface, so
//! packets for it, from this namespace or routed through it, are delivered locally to the
//! proxy's listeners (what kube-proxy's IPVS mode does). Kernels built without dummy
//! interfaces get the addresses on the loopback interface instead (IPv4 ones labelled
//! `lo:svcpx`, so that leftovers of a crash are found and removed at the next start).
//!
//! With client source preservation, the replies of backends to client addresses must reach
//! the proxy's transparent sockets too: packets matching a transparent socket are marked by an
//! nftables rule, and a policy rule routes marked packets to the local stack.
//!
//! Everything is created at start and removed on exit (or when dropped): the interface (or
//! the loopback addresses), the nftables table and the policy rule. Uses `ip` and `nft`
//! (iproute2, nftables).

use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;
use std::process::Command;

use tracing::{info, warn};

/// Firewall mark and routing table of the source-preservation routing.
const MARK: &str = "0x5350";
const TABLE: &str = "53535";
const NFT_TABLE: &str = "svcproxyd";
/// The loopback label of captured IPv4 addresses (when there is no dummy interface).
const LABEL: &str = "lo:svcpx";

fn run(program: &str, args: &[&str]) -> io::Result<()> {
    let out = Command::new(program).args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The capture set up for this daemon.
pub struct Capture {
    /// The dummy interface, or `None` for the loopback one.
    dummy: Option<String>,
    addresses: BTreeSet<IpAddr>,
    transparent: bool,
}

impl Capture {
    /// Creates the dummy interface (replacing a leftover one; the loopback interface where
    /// dummies are unavailable) and, with `transparent`, the routing for source preservation.
    pub fn new(interface: &str, transparent: bool) -> io::Result<Self> {
        let _ = run("ip", &["link", "del", interface]);
        let _ = run("ip", &["-4", "addr", "flush", "dev", "lo", "label", LABEL]);
        let dummy = match run("ip", &["link", "add", interface, "type", "dummy"]) {
            Ok(()) => {
                run("ip", &["link", "set", interface, "up"])?;
                Some(interface.to_string())
            }
            Err(e) => {
                warn!(error = %e, "no dummy interface: service addresses go on the loopback interface");
                None
            }
        };
        let mut capture = Self {
            dummy,
            addresses: BTreeSet::new(),
            transparent: false,
        };
        if transparent {
            let _ = run("nft", &["delete", "table", "inet", NFT_TABLE]);
            let rules = format!(
                "table inet {NFT_TABLE} {{\n  chain prerouting {{\n    type filter hook prerouting priority mangle; policy accept;\n    socket transparent 1 meta mark set {MARK}\n  }}\n}}\n"
            );
            let path = std::env::temp_dir().join(format!("svcproxyd-{}.nft", std::process::id()));
            std::fs::write(&path, rules)?;
            let loaded = run("nft", &["-f", &path.to_string_lossy()]);
            let _ = std::fs::remove_file(&path);
            loaded?;
            capture.transparent = true;
            for family in ["-4", "-6"] {
                let _ = run(
                    "ip",
                    &[family, "rule", "del", "fwmark", MARK, "lookup", TABLE],
                );
                run(
                    "ip",
                    &[family, "rule", "add", "fwmark", MARK, "lookup", TABLE],
                )?;
                let all = if family == "-4" { "0.0.0.0/0" } else { "::/0" };
                run(
                    "ip",
                    &[
                        family, "route", "replace", "local", all, "dev", "lo", "table", TABLE,
                    ],
                )?;
            }
        }
        info!(
            interface = capture.device(),
            transparent, "capturing service addresses"
        );
        Ok(capture)
    }

    fn device(&self) -> &str {
        self.dummy.as_deref().unwrap_or("lo")
    }

    /// Puts exactly `wanted` (minus wildcard and loopback addresses) on the interface.
    pub fn sync(&mut self, wanted: BTreeSet<IpAddr>) {
        let wanted: BTreeSet<IpAddr> = wanted
            .into_iter()
            .filter(|ip| !ip.is_unspecified() && !ip.is_loopback())
            .collect();
        let stale: Vec<IpAddr> = self.addresses.difference(&wanted).copied().collect();
        for ip in stale {
            match run("ip", &["addr", "del", &host(ip), "dev", self.device()]) {
                Ok(()) => {
                    self.addresses.remove(&ip);
                }
                Err(e) => warn!(%ip, error = %e, "cannot remove a service address"),
            }
        }
        let missing: Vec<IpAddr> = wanted.difference(&self.addresses).copied().collect();
        for ip in missing {
            let host = host(ip);
            let mut args = vec!["addr", "add", host.as_str(), "dev", self.device()];
            if self.dummy.is_none() && ip.is_ipv4() {
                args.extend(["label", LABEL]);
            }
            match run("ip", &args) {
                Ok(()) => {
                    self.addresses.insert(ip);
                }
                Err(e) => warn!(%ip, error = %e, "cannot add a service address"),
            }
        }
    }
}

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(_) => format!("{ip}/32"),
        IpAddr::V6(_) => format!("{ip}/128"),
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        match self.dummy.clone() {
            Some(interface) => {
                let _ = run("ip", &["link", "del", &interface]);
            }
            None => self.sync(BTreeSet::new()),
        }
        if self.transparent {
            let _ = run("nft", &["delete", "table", "inet", NFT_TABLE]);
            for family in ["-4", "-6"] {
                let _ = run(
                    "ip",
                    &[family, "rule", "del", "fwmark", MARK, "lookup", TABLE],
                );
                let _ = run("ip", &[family, "route", "flush", "table", TABLE]);
            }
        }
        info!(interface = self.device(), "capture removed");
    }
}
