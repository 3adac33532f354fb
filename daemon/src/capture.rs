//! Cluster IP capture (as root): every service address is put on a dummy interface, so
//! packets for it, from this namespace or routed through it, are delivered locally to the
//! proxy's listeners (what kube-proxy's IPVS mode does). Kernels built without dummy
//! interfaces get the addresses on the loopback interface instead (IPv4 ones labelled
//! `lo:svcpx`, so that leftovers of a crash are found and removed at the next start).
//!
//! With transparent listeners (`svcproxy_core::steering`, the default as root), the
//! nftables table also steers the frontends to them: four sets of (address, port), TCP and UDP
//! of each family, hold the steered frontends with an eligible endpoint, and a `tproxy` rule
//! per set hands their packets to the transparent listener of their family. A frontend not in
//! a set (no eligible endpoint) is refused by the kernel, as a closed listener would be. A
//! table change becomes one `nft -f -` transaction adding and deleting just the elements that
//! changed; if one fails, the next rewrites the sets whole.
//!
//! With client source preservation, the replies of backends to client addresses must reach
//! the proxy's transparent sockets too: packets matching a transparent socket are marked by an
//! nftables rule, and a policy rule routes marked packets to the local stack.
//!
//! Everything is created at start and removed on exit (or when dropped): the interface (or
//! the loopback addresses), the nftables table and the policy rule. Uses `ip` and `nft`
//! (iproute2, nftables): a table change's addresses are added and removed by one `ip -batch`
//! process, however many there are (10,000 addresses take a fraction of a second, not 10,000
//! processes), and the nftables rules go to `nft` on its standard input (no file: a file
//! written as root at a predictable path would follow a symlink planted there).

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::net::IpAddr;

use std::process::{Command, Stdio};
use svcproxy::core::{Protocol, ServicePortKey, Steering};

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

/// Runs `program` with `args`, `input` on its standard input; its standard error, and whether
/// it succeeded.
fn run_with_input(program: &str, args: &[&str], input: String) -> io::Result<(bool, String)> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("standard input is piped");
    // Written from another thread: the program may fill its standard error before it has
    // read all of its input.
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs `ip` commands (one per line, without the `ip`) in one `ip -force -batch -` process;
/// returns those that failed, by index, with ip's message.
fn ip_batch(commands: &[String]) -> io::Result<Vec<(usize, String)>> {
    if commands.is_empty() {
        return Ok(Vec::new());
    }
    let input = commands.join("\n") + "\n";
    let (ok, stderr) = run_with_input("ip", &["-force", "-batch", "-"], input)?;
    // Each failure is ip's message, then "Command failed -:N" (N counted from 1).
    let mut failed = Vec::new();
    let mut message = "";
    for line in stderr.lines() {
        match line.strip_prefix("Command failed -:") {
            Some(n) => {
                if let Some(i) = n
                    .trim()
                    .parse::<usize>()
                    .ok()
                    .and_then(|n| n.checked_sub(1))
                {
                    failed.push((i, message.to_string()));
                }
            }
            None => message = line,
        }
    }
    if !ok && failed.is_empty() {
        return Err(io::Error::other(format!("ip -batch: {}", stderr.trim())));
    }
    Ok(failed)
}

/// The capture set up for this daemon.
pub struct Capture {
    /// The dummy interface, or `None` for the loopback one.
    dummy: Option<String>,
    addresses: BTreeSet<IpAddr>,
    /// The nftables table is loaded (for steering or source preservation).
    nft: bool,
    /// The policy routing of source preservation is installed.
    preserve_client_ip: bool,
    /// Where steered frontends go, and which are in the sets now (`None`: unknown, after a
    /// failed change).
    steering: Option<(Steering, Option<BTreeSet<ServicePortKey>>)>,
}

/// The nftables set of frontends like `key`.
fn set_name(key: &ServicePortKey) -> &'static str {
    match (key.addr.is_ipv6(), key.protocol) {
        (false, Protocol::Tcp) => "tcp4",
        (false, Protocol::Udp) => "udp4",
        (true, Protocol::Tcp) => "tcp6",
        (true, Protocol::Udp) => "udp6",
    }
}

/// The nftables table: the steering sets and rules, and the mark of source preservation.
fn nft_table(steering: Option<Steering>, preserve_client_ip: bool) -> String {
    let mut sets = String::new();
    let mut rules = String::new();
    if preserve_client_ip {
        rules += &format!("    socket transparent 1 meta mark set {MARK}\n");
    }
    if let Some(steering) = steering {
        for (set, family, addr, v6) in [
            ("tcp4", "ip", "ipv4_addr", false),
            ("udp4", "ip", "ipv4_addr", false),
            ("tcp6", "ip6", "ipv6_addr", true),
            ("udp6", "ip6", "ipv6_addr", true),
        ] {
            let proto = &set[..3];
            let to = steering.listen_addr(v6);
            sets += &format!("  set {set} {{ type {addr} . inet_service; }}\n");
            rules += &format!(
                "    {family} daddr . {proto} dport @{set} tproxy {family} to {to} accept\n"
            );
        }
    }
    format!(
        "table inet {NFT_TABLE} {{\n{sets}  chain prerouting {{\n    type filter hook prerouting priority mangle; policy accept;\n{rules}  }}\n}}\n"
    )
}

/// `nft` element syntax for a frontend.
fn element(key: &ServicePortKey) -> String {
    format!("{} . {}", key.addr.ip(), key.addr.port())
}

/// `nft` commands that `verb` (add, delete) `keys` to or from their sets.
fn element_commands<'a>(verb: &str, keys: impl Iterator<Item = &'a ServicePortKey>) -> String {
    let mut by_set: [(&str, Vec<String>); 4] =
        ["tcp4", "udp4", "tcp6", "udp6"].map(|s| (s, Vec::new()));
    for key in keys {
        let set = set_name(key);
        if let Some((_, elements)) = by_set.iter_mut().find(|(s, _)| *s == set) {
            elements.push(element(key));
        }
    }
    by_set
        .iter()
        .filter(|(_, e)| !e.is_empty())
        .map(|(set, e)| {
            format!(
                "{verb} element inet {NFT_TABLE} {set} {{ {} }}\n",
                e.join(", ")
            )
        })
        .collect()
}

impl Capture {
    /// Creates the dummy interface (replacing a leftover one; the loopback interface where
    /// dummies are unavailable), with `steering` the rules that steer frontends to the
    /// transparent listeners, and with `preserve_client_ip` the routing for source
    /// preservation.
    pub fn new(
        interface: &str,
        steering: Option<Steering>,
        preserve_client_ip: bool,
    ) -> io::Result<Self> {
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
            nft: false,
            preserve_client_ip,
            steering: steering.map(|s| (s, Some(BTreeSet::new()))),
        };
        if steering.is_some() || preserve_client_ip {
            let _ = run("nft", &["delete", "table", "inet", NFT_TABLE]);
            nft(nft_table(steering, preserve_client_ip))?;
            capture.nft = true;
        }
        if preserve_client_ip {
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
            steering = ?steering,
            preserve_client_ip,
            "capturing service addresses"
        );
        Ok(capture)
    }

    fn device(&self) -> &str {
        self.dummy.as_deref().unwrap_or("lo")
    }

    /// Puts exactly `wanted` (minus wildcard and loopback addresses) on the interface, in one
    /// `ip` process; an address that cannot be added or removed is logged, and tried again at
    /// the next sync.
    pub fn sync(&mut self, wanted: BTreeSet<IpAddr>) {
        let wanted: BTreeSet<IpAddr> = wanted
            .into_iter()
            .filter(|ip| !ip.is_unspecified() && !ip.is_loopback())
            .collect();
        let device = self.device().to_string();
        let mut changes: Vec<(IpAddr, bool)> = self
            .addresses
            .difference(&wanted)
            .map(|&ip| (ip, false))
            .collect();
        changes.extend(wanted.difference(&self.addresses).map(|&ip| (ip, true)));
        let commands: Vec<String> = changes
            .iter()
            .map(|&(ip, add)| {
                let verb = if add { "add" } else { "del" };
                let label = if add && self.dummy.is_none() && ip.is_ipv4() {
                    format!(" label {LABEL}")
                } else {
                    String::new()
                };
                format!("addr {verb} {} dev {device}{label}", host(ip))
            })
            .collect();
        let failed = match ip_batch(&commands) {
            Ok(failed) => failed,
            Err(e) => {
                warn!(error = %e, changes = commands.len(), "cannot change the service addresses");
                return;
            }
        };
        let mut failed_at = failed.iter().map(|(i, _)| *i).peekable();
        for (i, &(ip, add)) in changes.iter().enumerate() {
            if failed_at.peek() == Some(&i) {
                failed_at.next();
                continue;
            }
            if add {
                self.addresses.insert(ip);
            } else {
                self.addresses.remove(&ip);
            }
        }
        if let Some((i, message)) = failed.first() {
            warn!(
                address = %changes[*i].0,
                error = %message,
                failed = failed.len(),
                of = changes.len(),
                "cannot change some service addresses; trying again at the next change"
            );
        }
    }

    /// Puts exactly `wanted` in the steering sets (nothing without steering), in one
    /// transaction; when it fails, it is logged and the next call rewrites the sets whole.
    pub fn steer(&mut self, wanted: impl Iterator<Item = ServicePortKey>) {
        let Some((_, current)) = &mut self.steering else {
            return;
        };
        let wanted: BTreeSet<ServicePortKey> = wanted.collect();
        let commands = match current {
            Some(current) => {
                element_commands("delete", current.difference(&wanted))
                    + &element_commands("add", wanted.difference(current))
            }
            None => {
                let flush: String = ["tcp4", "udp4", "tcp6", "udp6"]
                    .iter()
                    .map(|set| format!("flush set inet {NFT_TABLE} {set}\n"))
                    .collect();
                flush + &element_commands("add", wanted.iter())
            }
        };
        if commands.is_empty() {
            return;
        }
        match nft(commands) {
            Ok(()) => *current = Some(wanted),
            Err(e) => {
                warn!(error = %e, "cannot change the steered frontends; rewriting them at the next change");
                *current = None;
            }
        }
    }

    /// The service addresses on the interface now.
    pub fn addresses(&self) -> &BTreeSet<IpAddr> {
        &self.addresses
    }
}

/// Runs `nft -f -` with `commands` (one transaction).
fn nft(commands: String) -> io::Result<()> {
    let (ok, stderr) = run_with_input("nft", &["-f", "-"], commands)?;
    if ok {
        Ok(())
    } else {
        Err(io::Error::other(format!("nft -f -: {}", stderr.trim())))
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
        if self.nft {
            let _ = run("nft", &["delete", "table", "inet", NFT_TABLE]);
        }
        if self.preserve_client_ip {
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
