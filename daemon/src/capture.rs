//! Cluster IP capture (as root): packets for service addresses, from this namespace or routed
//! through it, are delivered locally to the proxy. Two ways, after the listeners:
//!
//! - **Transparent listeners** (`svcproxy_core::steering`, the default): no address is put on
//!   any interface. One nftables table holds the service addresses in two sets (`addrs4`,
//!   `addrs6`) and the steered frontends with an eligible endpoint in four (`tcp4`, `udp4`,
//!   `tcp6`, `udp6`: address . port). In prerouting, a frontend's packets are handed to the
//!   transparent listener of their family (`tproxy`) and every packet to a service address is
//!   marked; a policy rule routes marked packets to the local stack (`ip rule fwmark 0x5350
//!   lookup 53535`, `local 0.0.0.0/0 dev lo` there). Packets of local clients are marked in
//!   output (a route chain: they are routed again, through the loopback interface, and meet
//!   prerouting there). In input, what reaches a service address at a port that is not a
//!   served frontend (no eligible endpoint, or a port the service does not declare) is
//!   rejected: TCP with a reset, as a closed listener would be; other datagrams with an ICMP
//!   error from a node address, which a client does not match to its socket, so for it they
//!   are dropped. A host daemon listening on a wildcard address does not answer on service
//!   addresses. Nothing is announced by ARP or NDP, since the node does not hold the addresses.
//!   A table change is one `nft -f -` transaction adding and deleting just the elements that
//!   changed (if one fails, the next rewrites the sets whole): 10,000 services are captured in
//!   a tenth of a second, where the kernel takes seconds to add 10,000 addresses to an
//!   interface, and more than quadratically longer for more. Local clients need a route to the
//!   service addresses (the default route does) to pick a source address before the output
//!   chain re-routes their packets.
//! - **A listener per frontend**: every service address is put on a dummy interface (what
//!   kube-proxy's IPVS mode does), added and removed through netlink.
//!   Kernels built without dummy interfaces get the addresses on the loopback interface
//!   instead (IPv4 ones labelled `lo:svcpx`, so that leftovers of a crash are found and
//!   removed at the next start). So that the node does not answer ARP requests for them on its
//!   other interfaces (IPv4 answers for any local address by default), capture sets
//!   kube-proxy's `strictARP` (`net.ipv4.conf.all.arp_ignore=1`, `arp_announce=2`) while it
//!   runs, and puts the previous values back when it ends.
//!
//! With client source preservation, the replies of backends to client addresses must reach
//! the proxy's transparent sockets too: packets matching a transparent socket are marked by an
//! nftables rule, and the same policy rule delivers them locally.
//!
//! Everything is created at start and removed on exit (or when dropped): the interface (or
//! the loopback addresses), the nftables table and the policy rule. In a handover to another
//! svcproxyd ([`crate::upgrade`]) nothing is removed or re-created: the running process
//! describes its capture ([`Capture::hand_over`], a [`CaptureState`]) and the new one
//! takes it as it is ([`Capture::adopt`]), so packets are captured all along. Links, addresses, rules and
//! routes change through netlink ([`crate::netlink`]); the nftables rules go to `nft`
//! (nftables) on its standard input (no file: a file written as root at a predictable path
//! would follow a symlink planted there).

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::net::IpAddr;

use crate::netlink::Netlink;
use std::process::{Command, Stdio};
use svcproxy::core::steering::steerable;
use svcproxy::core::{Protocol, ServicePortKey, Steering};

use tracing::{info, warn};

/// Firewall mark and routing table of the source-preservation routing.
const MARK: u32 = 0x5350;
const TABLE: u32 = 53535;
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

/// The capture set up for this daemon.
pub struct Capture {
    netlink: Netlink,
    /// The dummy interface, or `None` for the loopback one (a listener per frontend).
    dummy: Option<String>,
    /// The index of the interface the addresses go on (the dummy or the loopback one).
    device: u32,
    /// The loopback interface's index.
    lo: u32,
    /// The service addresses on the interface, or in the address sets (steering).
    addresses: BTreeSet<IpAddr>,
    /// The nftables table is loaded (for steering or source preservation).
    nft: bool,
    /// The policy routing of marked packets is installed.
    routing: bool,
    /// Where steered frontends go.
    steering: Option<Steering>,
    /// Steering: the frontends in the sets; `None` after a failed change, when the sets are
    /// not known and the next change rewrites them whole.
    steered: Option<BTreeSet<ServicePortKey>>,
    /// The ARP settings replaced by strict ones (addresses on an interface), to put back.
    arp: Vec<(&'static str, String)>,
    /// The routing and marking of client source preservation are installed.
    preserve_client_ip: bool,
    /// This process owns the capture: dropping it removes it. Not while another process
    /// may (taken over and not confirmed yet; handed over).
    owned: bool,
}

/// What a capture holds, handed from one svcproxyd to the next.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CaptureState {
    /// The dummy interface the addresses are on (`None`: the loopback interface, or none
    /// with steering).
    pub dummy: Option<String>,
    /// The port of the transparent listeners, when frontends are steered.
    pub steering: Option<u16>,
    /// The routing of source preservation is installed.
    pub preserve_client_ip: bool,
    /// The service addresses captured.
    pub addresses: BTreeSet<IpAddr>,
    /// Steering: the frontends in the sets (`None`: unknown, rewritten at the next sync).
    pub steered: Option<BTreeSet<ServicePortKey>>,
    /// The nftables table is loaded.
    pub nft: bool,
    /// The policy routing of marked packets is installed.
    pub routing: bool,
    /// The ARP settings to put back at the end, by path.
    pub arp: Vec<(String, String)>,
}

/// kube-proxy's `strictARP`: answer ARP only for addresses of the interface asked on, and
/// announce only such addresses.
const STRICT_ARP: [(&str, &str); 2] = [
    ("/proc/sys/net/ipv4/conf/all/arp_ignore", "1"),
    ("/proc/sys/net/ipv4/conf/all/arp_announce", "2"),
];

/// Sets [`STRICT_ARP`]; the values it replaced. On failure, nothing is changed.
fn strict_arp() -> io::Result<Vec<(&'static str, String)>> {
    let mut previous = Vec::new();
    for (path, value) in STRICT_ARP {
        let set = std::fs::read_to_string(path).and_then(|old| {
            std::fs::write(path, value)?;
            Ok(old)
        });
        match set {
            Ok(old) => previous.push((path, old.trim().to_string())),
            Err(e) => {
                restore(&previous);
                return Err(io::Error::other(format!("{path}: {e}")));
            }
        }
    }
    Ok(previous)
}

/// Puts back settings `strict_arp` replaced.
fn restore(settings: &[(&'static str, String)]) {
    for (path, value) in settings {
        if let Err(e) = std::fs::write(path, value) {
            warn!(path, error = %e, "cannot put the ARP setting back");
        }
    }
}

/// What goes in a set of the nftables table.
trait Element {
    /// The set.
    fn set(&self) -> &'static str;
    /// In `nft` syntax.
    fn text(&self) -> String;
}

impl Element for ServicePortKey {
    fn set(&self) -> &'static str {
        match (self.addr.is_ipv6(), self.protocol) {
            (false, Protocol::Tcp) => "tcp4",
            (false, Protocol::Udp) => "udp4",
            (true, Protocol::Tcp) => "tcp6",
            (true, Protocol::Udp) => "udp6",
        }
    }
    fn text(&self) -> String {
        format!("{} . {}", self.addr.ip(), self.addr.port())
    }
}

impl Element for IpAddr {
    fn set(&self) -> &'static str {
        if self.is_ipv6() { "addrs6" } else { "addrs4" }
    }
    fn text(&self) -> String {
        self.to_string()
    }
}

/// Every set of the table.
const SETS: [&str; 6] = ["addrs4", "addrs6", "tcp4", "udp4", "tcp6", "udp6"];

/// The nftables table: the steering sets and rules, and the mark of source preservation.
fn nft_table(steering: Option<Steering>, preserve_client_ip: bool) -> String {
    let mut sets = String::new();
    let mut pre = String::new();
    let mut input = String::new();
    let mut output = String::new();
    if preserve_client_ip {
        pre += &format!("    socket transparent 1 meta mark set {MARK:#x}\n");
    }
    if let Some(steering) = steering {
        for (family, addr, v6) in [("ip", "ipv4_addr", false), ("ip6", "ipv6_addr", true)] {
            let to = steering.listen_addr(v6);
            let n = if v6 { 6 } else { 4 };
            sets += &format!("  set addrs{n} {{ type {addr}; }}\n");
            for proto in ["tcp", "udp"] {
                sets += &format!("  set {proto}{n} {{ type {addr} . inet_service; }}\n");
                pre += &format!(
                    "    {family} daddr . {proto} dport @{proto}{n} tproxy {family} to {to} meta mark set {MARK:#x} accept\n"
                );
                input += &format!("    {family} daddr . {proto} dport @{proto}{n} accept\n");
            }
            pre += &format!("    {family} daddr @addrs{n} meta mark set {MARK:#x}\n");
            input += &format!(
                "    {family} daddr @addrs{n} meta l4proto tcp reject with tcp reset\n    {family} daddr @addrs{n} reject\n"
            );
            output += &format!("    {family} daddr @addrs{n} meta mark set {MARK:#x}\n");
        }
    }
    let chain = |name: &str, kind: &str, hook: &str, priority: &str, rules: &str| {
        if rules.is_empty() {
            String::new()
        } else {
            format!(
                "  chain {name} {{\n    type {kind} hook {hook} priority {priority}; policy accept;\n{rules}  }}\n"
            )
        }
    };
    format!(
        "table inet {NFT_TABLE} {{\n{sets}{}{}{}}}\n",
        chain("prerouting", "filter", "prerouting", "mangle", &pre),
        chain("input", "filter", "input", "filter", &input),
        chain("output", "route", "output", "mangle", &output),
    )
}

/// `nft` commands that `verb` (add, delete) `elements` to or from their sets, one per set.
fn element_commands<'a, E: Element + 'a>(
    verb: &str,
    elements: impl Iterator<Item = &'a E>,
) -> String {
    let mut by_set: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for e in elements {
        by_set.entry(e.set()).or_default().push(e.text());
    }
    by_set
        .iter()
        .map(|(set, e)| {
            format!(
                "{verb} element inet {NFT_TABLE} {set} {{ {} }}\n",
                e.join(", ")
            )
        })
        .collect()
}

/// Commands that change the elements of their sets from `current` (unknown: everything) to
/// `wanted`.
fn set_changes<E: Element + Ord>(current: Option<&BTreeSet<E>>, wanted: &BTreeSet<E>) -> String {
    match current {
        Some(current) => {
            element_commands("delete", current.difference(wanted))
                + &element_commands("add", wanted.difference(current))
        }
        None => element_commands("add", wanted.iter()),
    }
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
        let netlink = Netlink::new()?;
        netlink.delete_link(interface)?;
        let lo = netlink
            .link_index("lo")?
            .ok_or_else(|| io::Error::other("no loopback interface"))?;
        netlink.flush_label(lo, LABEL)?;
        let dummy = match steering {
            Some(_) => None,
            None => match netlink.add_dummy(interface) {
                Ok(index) => Some((interface.to_string(), index)),
                Err(e) => {
                    warn!(error = %e, "no dummy interface: service addresses go on the loopback interface");
                    None
                }
            },
        };
        let (dummy, device) = match dummy {
            Some((name, index)) => (Some(name), index),
            None => (None, lo),
        };
        let mut capture = Self {
            netlink,
            dummy,
            device,
            lo,
            addresses: BTreeSet::new(),
            nft: false,
            routing: false,
            steering,
            steered: Some(BTreeSet::new()),
            arp: Vec::new(),
            preserve_client_ip,
            owned: true,
        };
        if steering.is_none() {
            capture.arp = strict_arp()?;
        }
        if steering.is_some() || preserve_client_ip {
            let _ = run("nft", &["delete", "table", "inet", NFT_TABLE]);
            nft(nft_table(steering, preserve_client_ip))?;
            capture.nft = true;
            capture.routing = true;
            capture.netlink.add_mark_routing(MARK, TABLE, capture.lo)?;
        }
        info!(
            interface = capture.interface(),
            steering = ?steering,
            preserve_client_ip,
            "capturing service addresses"
        );
        Ok(capture)
    }

    /// Takes over the capture another svcproxyd handed over, as it is, not owned until
    /// [`Capture::own`] (dropped before that, it is left in place for the other process).
    /// Fails, changing nothing, when it was made for other settings (`steering`,
    /// `preserve_client_ip`) than this process's, or its interface is gone.
    pub fn adopt(
        state: CaptureState,
        steering: Option<Steering>,
        preserve_client_ip: bool,
    ) -> io::Result<Self> {
        let port = steering.map(|s| s.listen_addr(false).port());
        if state.steering != port || state.preserve_client_ip != preserve_client_ip {
            return Err(io::Error::other(format!(
                "the running svcproxyd captures with listeners {} and client address preservation {}; this one is configured with {} and {}",
                listeners(state.steering),
                on_off(state.preserve_client_ip),
                listeners(port),
                on_off(preserve_client_ip)
            )));
        }
        let netlink = Netlink::new()?;
        let lo = netlink
            .link_index("lo")?
            .ok_or_else(|| io::Error::other("no loopback interface"))?;
        let device = match &state.dummy {
            Some(name) => netlink
                .link_index(name)?
                .ok_or_else(|| io::Error::other(format!("the capture interface {name} is gone")))?,
            None => lo,
        };
        let arp = state
            .arp
            .iter()
            .filter_map(|(path, value)| {
                let known = STRICT_ARP.iter().find(|(p, _)| p == path)?.0;
                Some((known, value.clone()))
            })
            .collect();
        let capture = Self {
            netlink,
            dummy: state.dummy,
            device,
            lo,
            addresses: state.addresses,
            nft: state.nft,
            routing: state.routing,
            steering,
            steered: state.steered,
            arp,
            preserve_client_ip,
            owned: false,
        };
        info!(
            interface = capture.interface(),
            addresses = capture.addresses.len(),
            "capture taken over from the previous svcproxyd"
        );
        Ok(capture)
    }

    /// What this capture holds, for a process taking it over ([`Capture::adopt`]).
    pub fn state(&self) -> CaptureState {
        CaptureState {
            dummy: self.dummy.clone(),
            steering: self.steering.map(|s| s.listen_addr(false).port()),
            preserve_client_ip: self.preserve_client_ip,
            addresses: self.addresses.clone(),
            steered: self.steered.clone(),
            nft: self.nft,
            routing: self.routing,
            arp: self
                .arp
                .iter()
                .map(|(p, v)| (p.to_string(), v.clone()))
                .collect(),
        }
    }

    /// Another process has taken this capture over: dropping it removes nothing.
    pub fn hand_over(mut self) {
        self.owned = false;
    }

    /// The process this capture was taken over from has let go of it: this one owns it.
    pub fn own(&mut self) {
        self.owned = true;
    }

    /// Where the addresses go, for the log.
    fn interface(&self) -> &str {
        match self.steering {
            Some(_) => "none (nftables sets)",
            None => self.dummy.as_deref().unwrap_or("lo"),
        }
    }

    /// Captures exactly the service addresses `wanted` (minus wildcard and loopback ones)
    /// and, with steering, steers exactly the frontends `steered`. Failures are logged and
    /// tried again at the next sync.
    pub fn sync(
        &mut self,
        wanted: BTreeSet<IpAddr>,
        steered: impl Iterator<Item = ServicePortKey>,
    ) {
        let wanted: BTreeSet<IpAddr> = wanted.into_iter().filter(|ip| steerable(*ip)).collect();
        match self.steering {
            Some(_) => self.steer(wanted, steered.collect()),
            None => self.put_on_interface(wanted),
        }
    }

    /// Puts exactly `wanted` on the interface; an address that cannot be added or removed is
    /// logged, and tried again at the next sync.
    fn put_on_interface(&mut self, wanted: BTreeSet<IpAddr>) {
        let mut changes: Vec<(IpAddr, bool)> = self
            .addresses
            .difference(&wanted)
            .map(|&ip| (ip, false))
            .collect();
        changes.extend(wanted.difference(&self.addresses).map(|&ip| (ip, true)));
        let label = self.dummy.is_none().then_some(LABEL);
        let failed = self.netlink.change_addresses(self.device, &changes, label);
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

    /// Puts exactly `addresses` and `frontends` in their sets, in one transaction; when it
    /// fails, it is logged and the next sync rewrites the sets whole.
    fn steer(&mut self, addresses: BTreeSet<IpAddr>, frontends: BTreeSet<ServicePortKey>) {
        let known = self.steered.as_ref();
        let mut commands = set_changes(known.map(|_| &self.addresses), &addresses)
            + &set_changes(known, &frontends);
        if known.is_none() {
            let flush: String = SETS
                .iter()
                .map(|set| format!("flush set inet {NFT_TABLE} {set}\n"))
                .collect();
            commands = flush + &commands;
        }
        if commands.is_empty() {
            return;
        }
        match nft(commands) {
            Ok(()) => {
                self.addresses = addresses;
                self.steered = Some(frontends);
            }
            Err(e) => {
                warn!(error = %e, "cannot change the captured services; rewriting them at the next change");
                self.steered = None;
            }
        }
    }

    /// The service addresses captured now.
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

fn listeners(port: Option<u16>) -> String {
    match port {
        Some(port) => format!("transparent (port {port})"),
        None => "per-frontend".to_string(),
    }
}

fn on_off(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if !self.owned {
            info!(
                interface = self.interface(),
                "capture left in place for the other svcproxyd"
            );
            return;
        }
        match self.dummy.clone() {
            Some(interface) => {
                if let Err(e) = self.netlink.delete_link(&interface) {
                    warn!(interface, error = %e, "cannot remove the capture interface");
                }
            }
            None if self.steering.is_none() => self.put_on_interface(BTreeSet::new()),
            None => {}
        }
        if self.nft {
            let _ = run("nft", &["delete", "table", "inet", NFT_TABLE]);
        }
        restore(&self.arp);
        if self.routing
            && let Err(e) = self.netlink.delete_mark_routing(MARK, TABLE)
        {
            warn!(error = %e, "cannot remove the policy routing of marked packets");
        }
        info!(interface = self.interface(), "capture removed");
    }
}
