//! Cluster IP capture (as root): every service address is put on a dummy interface, so
//! packets for it, from this namespace or routed through it, are delivered locally to the
//! proxy's listeners (what kube-proxy's IPVS mode does). With client source preservation, the
//! replies of backends to client addresses must reach the proxy's transparent sockets too:
//! packets matching a transparent socket are marked by an nftables rule, and a policy rule
//! routes marked packets to the local stack.
//!
//! Everything is created at start and removed on exit (or when dropped): the interface (with
//! its addresses), the nftables table and the policy rule. Uses `ip` and `nft` (iproute2,
//! nftables).

use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;
use std::process::Command;

use tracing::{info, warn};

/// Firewall mark and routing table of the source-preservation routing.
const MARK: &str = "0x5350";
const TABLE: &str = "53535";
const NFT_TABLE: &str = "svcproxyd";

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
    interface: String,
    addresses: BTreeSet<IpAddr>,
    transparent: bool,
}

impl Capture {
    /// Creates the dummy interface (replacing a leftover one) and, with `transparent`, the
    /// routing for source preservation.
    pub fn new(interface: &str, transparent: bool) -> io::Result<Self> {
        let _ = run("ip", &["link", "del", interface]);
        run("ip", &["link", "add", interface, "type", "dummy"])?;
        run("ip", &["link", "set", interface, "up"])?;
        let mut capture = Self {
            interface: interface.to_string(),
            addresses: BTreeSet::new(),
            transparent: false,
        };
        if transparent {
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
                run(
                    "ip",
                    &[family, "rule", "add", "fwmark", MARK, "lookup", TABLE],
                )?;
                let all = if family == "-4" { "0.0.0.0/0" } else { "::/0" };
                run(
                    "ip",
                    &[
                        family, "route", "add", "local", all, "dev", "lo", "table", TABLE,
                    ],
                )?;
            }
        }
        info!(interface, transparent, "capturing service addresses");
        Ok(capture)
    }

    /// Puts exactly `wanted` (minus wildcard and loopback addresses) on the interface.
    pub fn sync(&mut self, wanted: BTreeSet<IpAddr>) {
        let wanted: BTreeSet<IpAddr> = wanted
            .into_iter()
            .filter(|ip| !ip.is_unspecified() && !ip.is_loopback())
            .collect();
        for ip in self
            .addresses
            .difference(&wanted)
            .copied()
            .collect::<Vec<_>>()
        {
            match run("ip", &["addr", "del", &host(ip), "dev", &self.interface]) {
                Ok(()) => {
                    self.addresses.remove(&ip);
                }
                Err(e) => warn!(%ip, error = %e, "cannot remove a service address"),
            }
        }
        for ip in wanted
            .difference(&self.addresses)
            .copied()
            .collect::<Vec<_>>()
        {
            match run("ip", &["addr", "add", &host(ip), "dev", &self.interface]) {
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
        let _ = run("ip", &["link", "del", &self.interface]);
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
        info!(interface = %self.interface, "capture removed");
    }
}
