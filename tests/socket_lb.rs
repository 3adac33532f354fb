//! Socket-level load balancing against the real cgroup hooks (root only; never skipped under
//! CI): a client process in a cgroup of its own and in the client namespace, two pods, and the
//! proxy in the node namespace serving what the socket does not.
//!
//! The client is this test binary again (`client_helper`), started inside the cgroup before it
//! enters the namespace; it runs the commands the test writes to its stdin and answers each
//! with one line starting with `=> `.

#[path = "../daemon/tests/common/topology.rs"]
mod topology;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use svcproxy::{
    Batch, Endpoint, Options, Policy, Proxy, ProxyConfig, Service, ServicePort, SessionAffinity,
    Table,
};
use topology::{Cgroup, Pod, Topology, alone, ip, root};

const HELPER: &str = "SVCPROXY_SOCKLB_CLIENT";
const POD_A: &str = "198.18.2.2:8080";
const POD_B: &str = "198.18.3.2:8080";
const UDP_A: &str = "198.18.2.2:5353";
const UDP_B: &str = "198.18.3.2:5353";
const CLIENT: &str = "198.18.1.2";

/// The client process.
struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    fn start(cgroup: &Path, ns: &str) -> Self {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && exec ip netns exec "$2" "$3" --exact client_helper --ignored --nocapture -q"#)
            .arg("sh")
            .arg(cgroup)
            .arg(ns)
            .arg(exe)
            .env(HELPER, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut client = Client {
            child,
            stdin,
            stdout,
        };
        assert_eq!(client.ask("hello"), "hello");
        client
    }

    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                self.stdout.read_line(&mut line).unwrap() > 0,
                "the client helper ended"
            );
            if let Some(answer) = line.strip_prefix("=> ") {
                return answer.trim_end().to_string();
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "exit");
        let _ = self.child.wait();
    }
}

/// The client's side: runs only when started by [`Client::start`].
#[test]
#[ignore = "started by the socket-lb tests as their client"]
fn client_helper() {
    if std::env::var_os(HELPER).is_none() {
        return;
    }
    let mut udp: HashMap<String, UdpSocket> = HashMap::new();
    let mut load: Option<Load> = None;
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["hello"] => "hello".to_string(),
            // Long enough for a first neighbour discovery (IPv6) under load.
            ["tcp", addr] => tcp(addr.parse().unwrap(), Duration::from_secs(10)),
            ["udp", addr] => {
                let addr: SocketAddr = addr.parse().unwrap();
                let socket = udp.entry(addr.to_string()).or_insert_with(|| {
                    let any = if addr.is_ipv4() {
                        "0.0.0.0:0"
                    } else {
                        "[::]:0"
                    };
                    UdpSocket::bind(any).unwrap()
                });
                udp_exchange(socket, Some(addr))
            }
            ["udp-connected", addr] => {
                let addr: SocketAddr = addr.parse().unwrap();
                let any = if addr.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let socket = UdpSocket::bind(any).unwrap();
                match socket.connect(addr) {
                    Ok(()) => {
                        let peer = socket.peer_addr().unwrap();
                        format!("{peer} {}", udp_exchange(&socket, None))
                    }
                    Err(e) => format!("err {}", e.raw_os_error().unwrap_or(0)),
                }
            }
            ["load", addr, clients] => {
                load = Some(Load::start(addr.parse().unwrap(), clients.parse().unwrap()));
                "started".to_string()
            }
            ["mark"] => load.as_ref().unwrap().mark(),
            ["stop"] => load.take().unwrap().stop(),
            ["exit"] => return,
            _ => format!("unknown command {line}"),
        };
        println!("=> {answer}");
    }
}

/// Connects; `ok <peer> <answer>` or `err <errno>` (0: timed out).
fn tcp(addr: SocketAddr, timeout: Duration) -> String {
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(mut s) => {
            let peer = s.peer_addr().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            format!("ok {peer} {}", answer.trim())
        }
        Err(e) => format!("err {}", e.raw_os_error().unwrap_or(0)),
    }
}

/// Sends one datagram (to `to`, or on the connected socket); `ok <from> <answer>` or
/// `err <errno>`.
fn udp_exchange(socket: &UdpSocket, to: Option<SocketAddr>) -> String {
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let sent = match to {
        Some(to) => socket.send_to(b"ping", to),
        None => socket.send(b"ping"),
    };
    if let Err(e) = sent {
        return format!("err {}", e.raw_os_error().unwrap_or(0));
    }
    let mut buf = [0u8; 512];
    match socket.recv_from(&mut buf) {
        Ok((n, from)) => format!("ok {from} {}", String::from_utf8_lossy(&buf[..n])),
        Err(e) => format!("err {}", e.raw_os_error().unwrap_or(0)),
    }
}

/// Clients connecting in a loop; each connection is counted in the phase it ran in (`N`), or
/// the phases it straddled (`N-M`).
struct Load {
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Vec<(String, String)>>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|_| {
                let (stop, phase) = (stop.clone(), phase.clone());
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    let mut seen = Vec::new();
                    while !stop.load(Ordering::SeqCst)
                        && Instant::now() < deadline
                        && seen.len() < 10_000
                    {
                        let before = phase.load(Ordering::SeqCst);
                        // A pod's backlog overflows under 200 clients: its SYNs are
                        // retransmitted after a second or three.
                        let answer = tcp(addr, Duration::from_secs(10));
                        let after = phase.load(Ordering::SeqCst);
                        let p = if before == after {
                            before.to_string()
                        } else {
                            format!("{before}-{after}")
                        };
                        let pod = match answer.split_whitespace().collect::<Vec<_>>()[..] {
                            ["ok", _, pod, _] => pod.to_string(),
                            _ => format!("failed:{}", answer.replace(' ', "_")),
                        };
                        seen.push((p, pod));
                    }
                    seen
                })
            })
            .collect();
        Load {
            stop,
            phase,
            threads,
        }
    }

    fn mark(&self) -> String {
        (self.phase.fetch_add(1, Ordering::SeqCst) + 1).to_string()
    }

    /// `phase:pod=count ...`, sorted.
    fn stop(self) -> String {
        self.stop.store(true, Ordering::SeqCst);
        let mut counts: std::collections::BTreeMap<(String, String), u64> = Default::default();
        for t in self.threads {
            for seen in t.join().unwrap() {
                *counts.entry(seen).or_default() += 1;
            }
        }
        let parts: Vec<String> = counts
            .into_iter()
            .map(|((phase, pod), n)| format!("{phase}:{pod}={n}"))
            .collect();
        parts.join(" ")
    }
}

/// The namespaces, the pods, the proxy in the node namespace (listening on the service
/// addresses, which are the node's), and the socket-level load balancing on a test cgroup.
struct Stack {
    client: Client,
    proxy: Proxy,
    table: Arc<Table>,
    cgroup: Cgroup,
    pods: Vec<Pod>,
    topology: Topology,
}

impl Stack {
    fn new(ipv6: bool) -> Self {
        let topology = Topology::new();
        if ipv6 {
            topology.add_ipv6();
        }
        for addr in ["198.18.0.10/32", "198.18.0.11/32", "198.18.0.12/32"] {
            ip(&["-n", &topology.node, "addr", "add", addr, "dev", "lo"]);
        }
        let pods = vec![
            Pod::start(&topology.pods[0], "a"),
            Pod::start(&topology.pods[1], "b"),
        ];
        let table = Arc::new(Table::default());
        let proxy = {
            let table = table.clone();
            Topology::within(&topology.node, move || {
                let config = ProxyConfig {
                    workers: 1,
                    ..ProxyConfig::default()
                };
                Proxy::start(
                    table,
                    Options {
                        config,
                        ..Options::default()
                    },
                )
                .unwrap()
            })
        };
        let cgroup = Cgroup::new();
        proxy.attach_socket_lb(&cgroup.0).unwrap();
        let client = Client::start(&cgroup.0, &topology.client);
        Stack {
            client,
            proxy,
            table,
            cgroup,
            pods,
            topology,
        }
    }

    fn set(&self, service: Service, endpoints: &[&str]) {
        let name = service.name.clone();
        let endpoints = endpoints
            .iter()
            .map(|e| Endpoint::new(e.parse().unwrap()))
            .collect();
        self.table
            .apply(
                Batch::new()
                    .upsert(service)
                    .replace_endpoints(name, endpoints),
            )
            .unwrap();
    }

    fn pod_of(answer: &str) -> String {
        match answer.split_whitespace().collect::<Vec<_>>()[..] {
            ["ok", _, pod, _] => pod.to_string(),
            _ => panic!("no pod answered: {answer}"),
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // The client leaves the cgroup (by ending) before the cgroup is removed; the fields
        // are dropped in declaration order after this.
        self.proxy.detach_socket_lb();
    }
}

fn web(addr: &str, port: u16) -> Service {
    Service::new(format!("default/web-{addr}-{port}"))
        .address(addr.parse().unwrap())
        .port(ServicePort::tcp(port))
}

fn dns(addr: &str) -> Service {
    Service::new(format!("default/dns-{addr}"))
        .address(addr.parse().unwrap())
        .port(ServicePort::udp(53))
}

#[test]
fn connect_time_round_robin_shows_the_service_and_keeps_the_client_address() {
    if !root() {
        return;
    }
    let _alone = alone();
    let mut s = Stack::new(false);
    s.set(web("198.18.0.10", 80), &[POD_A, POD_B]);
    let mut pods = Vec::new();
    for _ in 0..6 {
        let answer = s.client.ask("tcp 198.18.0.10:80");
        let words: Vec<&str> = answer.split_whitespace().collect();
        assert_eq!(words[0], "ok", "{answer}");
        assert_eq!(words[1], "198.18.0.10:80", "getpeername shows the service");
        assert_eq!(words[3], CLIENT, "the pod sees the client's own address");
        pods.push(words[2].to_string());
    }
    assert_eq!(pods, ["a", "b", "a", "b", "a", "b"], "exact round robin");
    let stats = s.proxy.stats();
    let counted = stats
        .iter()
        .find(|p| p.service.starts_with("default/web"))
        .unwrap();
    assert_eq!(counted.totals.connections_total, 6);
    let per_endpoint: Vec<u64> = counted
        .endpoints
        .iter()
        .map(|(_, v)| v.connections_total)
        .collect();
    assert_eq!(per_endpoint, [3, 3]);
    let web_totals = |stats: Vec<svcproxy::PortStats>| {
        let web = stats
            .into_iter()
            .find(|p| p.service.starts_with("default/web"));
        web.map(|p| (p.totals.connections_total, p.endpoints.len()))
    };
    assert_eq!(
        web_totals(s.table.load().stats()),
        Some((0, 2)),
        "the workers saw none of them"
    );

    // Pod b leaves; at the change after, no program can count for it any more, and its
    // counters fold into the service port's totals: they never go back.
    s.set(web("198.18.0.10", 80), &[POD_A]);
    s.set(web("198.18.0.10", 80).policy(Policy::Random), &[POD_A]);
    assert_eq!(web_totals(s.proxy.stats()), Some((6, 1)));
    // Off the socket path (least connections is the proxy's to do): the totals stay, and the
    // proxy's own connections add to them.
    s.set(
        web("198.18.0.10", 80).policy(Policy::LeastConnections),
        &[POD_A],
    );
    assert_eq!(web_totals(s.proxy.stats()), Some((6, 1)));
    assert_eq!(s.proxy.socket_lb().unwrap().frontends, 0);
    s.proxy.sync(Duration::from_secs(5)).unwrap();
    for _ in 0..2 {
        assert_eq!(Stack::pod_of(&s.client.ask("tcp 198.18.0.10:80")), "a");
    }
    assert_eq!(web_totals(s.proxy.stats()), Some((8, 1)));
}

#[test]
fn no_endpoint_refuses_at_connect_and_what_the_socket_cannot_decide_goes_to_the_proxy() {
    if !root() {
        return;
    }
    let _alone = alone();
    let mut s = Stack::new(false);
    s.set(web("198.18.0.10", 80), &[]);
    assert_eq!(
        s.client.ask("tcp 198.18.0.10:80"),
        "err 111",
        "ECONNREFUSED"
    );
    s.set(dns("198.18.0.10"), &[]);
    assert_eq!(s.client.ask("udp 198.18.0.10:53"), "err 111");
    let refused: u64 = s.proxy.stats().iter().map(|p| p.totals.refused).sum();
    assert_eq!(refused, 2);

    // Least connections needs the proxy's own counts: the socket leaves it to the proxy,
    // whose connection to the pod comes from the node.
    let mut least = web("198.18.0.11", 80);
    least.policy = Policy::LeastConnections;
    s.set(least, &[POD_A]);
    s.proxy.sync(Duration::from_secs(5)).unwrap();
    let answer = s.client.ask("tcp 198.18.0.11:80");
    assert!(
        answer.starts_with("ok 198.18.0.11:80 a 198.18.2.1"),
        "{answer}"
    );
}

#[test]
fn endpoint_changes_apply_to_the_next_connect_under_load() {
    if !root() {
        return;
    }
    let _alone = alone();
    let mut s = Stack::new(false);
    s.set(web("198.18.0.10", 80), &[POD_A, POD_B]);
    assert_eq!(s.client.ask("load 198.18.0.10:80 200"), "started");
    std::thread::sleep(Duration::from_millis(500));
    // Pod b leaves the table, then stops: a connect begun after the change that still went
    // to it would fail. (Connections begun before it may fail as b stops.)
    s.set(web("198.18.0.10", 80), &[POD_A]);
    assert_eq!(s.client.ask("mark"), "1");
    s.pods.pop();
    std::thread::sleep(Duration::from_millis(500));
    // Pod b comes back and rejoins: connects begun after that use both again.
    // Phase 2 holds the change: its connections may go to either pod.
    s.pods.push(Pod::start(&s.topology.pods[1], "b"));
    assert_eq!(s.client.ask("mark"), "2");
    s.set(web("198.18.0.10", 80), &[POD_A, POD_B]);
    assert_eq!(s.client.ask("mark"), "3");
    std::thread::sleep(Duration::from_millis(500));
    let counts = s.client.ask("stop");
    let parts: HashMap<&str, u64> = counts
        .split_whitespace()
        .map(|p| {
            let (k, v) = p.rsplit_once('=').unwrap();
            (k, v.parse().unwrap())
        })
        .collect();
    for seen in ["0:a", "0:b", "1:a", "3:a", "3:b"] {
        assert!(
            parts.get(seen).copied().unwrap_or(0) > 0,
            "{seen}: {counts}"
        );
    }
    // Before the removal (or straddling it) pod b may fail as it stops; after it, nothing may.
    let wrong: Vec<&&str> = parts
        .keys()
        .filter(|k| !k.starts_with("0:") && !k.starts_with("0-"))
        .filter(|k| k.contains(":failed") || **k == "1:b")
        .collect();
    assert!(
        wrong.is_empty(),
        "after each change only its endpoints, and no failure: {counts}"
    );
}

#[test]
fn client_ip_affinity_holds_until_its_timeout() {
    if !root() {
        return;
    }
    let _alone = alone();
    let mut s = Stack::new(false);
    let mut sticky = web("198.18.0.10", 80);
    sticky.session_affinity = SessionAffinity::ClientIp {
        timeout: Duration::from_secs(1),
    };
    s.set(sticky, &[POD_A, POD_B]);
    let first = Stack::pod_of(&s.client.ask("tcp 198.18.0.10:80"));
    for _ in 0..5 {
        assert_eq!(Stack::pod_of(&s.client.ask("tcp 198.18.0.10:80")), first);
    }
    // The affinity expires one second after its last use.
    std::thread::sleep(Duration::from_millis(1300));
    let after = Stack::pod_of(&s.client.ask("tcp 198.18.0.10:80"));
    assert_ne!(after, first, "after the timeout the round robin goes on");
}

#[test]
fn udp_replies_come_from_the_service_and_flows_move_off_a_removed_endpoint() {
    if !root() {
        return;
    }
    let _alone = alone();
    let mut s = Stack::new(false);
    s.set(dns("198.18.0.10"), &[UDP_A, UDP_B]);
    let answer = s.client.ask("udp 198.18.0.10:53");
    let words: Vec<&str> = answer.split_whitespace().collect();
    assert_eq!(words[..2], ["ok", "198.18.0.10:53"], "{answer}");
    assert_eq!(words[3], CLIENT);
    let pod = words[2].to_string();
    for _ in 0..3 {
        assert_eq!(
            Stack::pod_of(&s.client.ask("udp 198.18.0.10:53")),
            pod,
            "the flow keeps its endpoint"
        );
    }
    let other = if pod == "a" { UDP_B } else { UDP_A };
    s.set(dns("198.18.0.10"), &[other]);
    let moved = s.client.ask("udp 198.18.0.10:53");
    assert_ne!(Stack::pod_of(&moved), pod, "the flow moved: {moved}");
    assert!(moved.starts_with("ok 198.18.0.10:53"), "{moved}");

    // A connected socket: getpeername and the replies show the service.
    let connected = s.client.ask("udp-connected 198.18.0.10:53");
    assert!(
        connected.starts_with("198.18.0.10:53 ok 198.18.0.10:53"),
        "{connected}"
    );
    let dns_stats = s.proxy.stats();
    let d = dns_stats
        .iter()
        .find(|p| p.service.starts_with("default/dns"))
        .unwrap();
    assert_eq!(
        d.totals.connections_total, 3,
        "two flows and a connected socket"
    );
    assert_eq!(d.totals.datagrams_in, 5);
}

#[test]
fn ipv6_services_are_balanced_at_the_socket() {
    if !root() {
        return;
    }
    let _alone = alone();
    let mut s = Stack::new(true);
    let mut v6 = Service::new("default/web6")
        .address("2001:db8:ff::10".parse().unwrap())
        .port(ServicePort::tcp(80));
    s.set(
        v6.clone(),
        &["[2001:db8:2::2]:8080", "[2001:db8:3::2]:8080"],
    );
    let mut pods = Vec::new();
    for _ in 0..4 {
        let answer = s.client.ask("tcp [2001:db8:ff::10]:80");
        let words: Vec<&str> = answer.split_whitespace().collect();
        assert_eq!(words[..2], ["ok", "[2001:db8:ff::10]:80"], "{answer}");
        assert_eq!(words[3], "2001:db8:1::2");
        pods.push(words[2].to_string());
    }
    assert_eq!(pods, ["a", "b", "a", "b"]);
    v6.name = "default/dns6".into();
    v6.ports = vec![ServicePort::udp(53)];
    s.set(v6, &["[2001:db8:3::2]:5353"]);
    let answer = s.client.ask("udp [2001:db8:ff::10]:53");
    assert!(
        answer.starts_with("ok [2001:db8:ff::10]:53 b 2001:db8:1::2"),
        "{answer}"
    );
}

#[test]
fn detaching_leaves_no_program_or_map() {
    if !root() {
        return;
    }
    let _alone = alone();
    let pinned_before = pins();
    let s = Stack::new(false);
    let cgroup = s.cgroup.0.clone();
    let attached = bpftool(&["cgroup", "show", cgroup.to_str().unwrap()]);
    for hook in [
        "connect4",
        "connect6",
        "sendmsg4",
        "recvmsg6",
        "getpeername4",
    ] {
        assert!(attached.contains(hook), "{hook} attached: {attached}");
    }
    let ours = maps_of(cgroup.to_str().unwrap());
    assert!(ours.len() >= 8, "the programs' maps: {ours:?}");
    assert!(ours.is_subset(&live_maps()));
    s.proxy.detach_socket_lb();
    assert_eq!(
        bpftool(&["cgroup", "show", cgroup.to_str().unwrap()]).trim(),
        ""
    );
    // Nothing was pinned: the programs lived by this process's links alone.
    assert_eq!(pins(), pinned_before, "nothing was left under /sys/fs/bpf");
    // Maps are freed once the last program using them is; that is asynchronous (RCU).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !live_maps().is_disjoint(&ours) {
        assert!(Instant::now() < deadline, "the maps were not freed");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(s);
    assert!(!cgroup.exists(), "the test cgroup is removed");
}

/// The ids of the maps that the programs attached to `cgroup` use.
fn maps_of(cgroup: &str) -> std::collections::BTreeSet<u32> {
    let programs: Vec<String> = bpftool(&["cgroup", "show", cgroup])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|id| id.parse::<u32>().is_ok())
        .map(str::to_string)
        .collect();
    programs
        .iter()
        .flat_map(|id| {
            let shown = bpftool(&["prog", "show", "id", id]);
            let ids = shown
                .split_whitespace()
                .skip_while(|w| *w != "map_ids")
                .nth(1)
                .unwrap_or_default()
                .to_string();
            ids.split(',')
                .filter_map(|m| m.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// The ids of every BPF map there is.
fn live_maps() -> std::collections::BTreeSet<u32> {
    bpftool(&["map", "show"])
        .lines()
        .filter_map(|l| l.split(':').next()?.trim().parse().ok())
        .collect()
}

fn bpftool(args: &[&str]) -> String {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .expect("bpftool is installed");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What is pinned under the BPF filesystem (empty when it is not mounted).
fn pins() -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = std::fs::read_dir("/sys/fs/bpf")
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    names.sort();
    names
}
