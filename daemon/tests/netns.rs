//! The classic Kubernetes picture, in network namespaces this test creates (root only):
//! a client pod and two backend pods, each joined to a node namespace by a veth pair, with
//! svcproxyd running in the node from a manifest file. Addresses come from 198.18.0.0/15:
//! client 198.18.1.2, pods 198.18.2.2 and 198.18.3.2, the node 198.18.{1,2,3}.1, cluster IPs
//! 198.19.0.10 (round robin) and 198.19.0.11 (ClientIP affinity).
//!
//! Without root the test says it was skipped; under CI (`CI` set) it must run.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

mod common;
#[path = "common/topology.rs"]
mod topology;

use topology::{Pod, Topology, alone, ip, root};

const BIN: &str = env!("CARGO_BIN_EXE_svcproxyd");
const TIMEOUT: Duration = Duration::from_secs(10);

fn output(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn manifest(endpoints: &[&str], with_web: bool) -> String {
    let eps: String = endpoints
        .iter()
        .map(|ip| format!("- addresses: [{ip}]\n  conditions: {{ready: true}}\n"))
        .collect();
    let web = if with_web {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
             spec:\n  clusterIP: 198.19.0.10\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  - {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-x, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: IPv4\nports:\n- {{name: http, port: 8080}}\n- {{name: dns, port: 5353, protocol: UDP}}\nendpoints:\n{eps}---\n"
        )
    } else {
        String::new()
    };
    format!(
        "{web}apiVersion: v1\nkind: Service\nmetadata: {{name: sticky, namespace: shop}}\n\
         spec:\n  clusterIP: 198.19.0.11\n  sessionAffinity: ClientIP\n  ports: [{{port: 80, targetPort: 8080}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: sticky-x, namespace: shop, labels: {{kubernetes.io/service-name: sticky}}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n- addresses: [198.18.2.2]\n- addresses: [198.18.3.2]\n"
    )
}

/// svcproxyd, and the temporary directory it was given (`TMPDIR`): it must write nothing
/// there (a file written as root at a predictable path would follow a planted symlink).
struct Daemon(Child, PathBuf);

impl Daemon {
    /// svcproxyd in namespace `ns`, once its health endpoint answers.
    fn start(ns: &str, config: &Path, extra: &[&str]) -> Self {
        let mut d = Self::spawn(ns, config, extra);
        let node = ns.to_string();
        // Long: with tens of thousands of services, the kernel takes its time adding addresses.
        wait_long("the health endpoint", || {
            assert!(d.0.try_wait().unwrap().is_none(), "svcproxyd exited early");
            let node = node.clone();
            Topology::within(&node, || TcpStream::connect("127.0.0.1:10256").is_ok())
        });
        d
    }

    /// svcproxyd in namespace `ns`, without waiting.
    fn spawn(ns: &str, config: &Path, extra: &[&str]) -> Self {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let tmp = std::env::temp_dir().join(format!("svcproxyd-tmp-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        // nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup v2 mount
        // (socket-level load balancing attaches there).
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{ns}"))
            .args([BIN, "run", "--node-name", "node", "--config"])
            .arg(config)
            .args(extra)
            .env("TMPDIR", &tmp)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self(child, tmp)
    }

    fn stop(mut self) -> i32 {
        let pid = rustix::process::Pid::from_raw(self.0.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                let written: Vec<_> = std::fs::read_dir(&self.1).unwrap().collect();
                assert!(written.is_empty(), "svcproxyd wrote to TMPDIR: {written:?}");
                return s.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "svcproxyd did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn wait(what: &str, condition: impl FnMut() -> bool) {
    wait_every(what, Duration::from_millis(20), condition);
}

/// As [`wait`], looking every `interval` (short, where the wait is timed).
fn wait_every(what: &str, interval: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(interval);
    }
}

/// (pod, the client address the pod saw) for a TCP connection from the client pod.
fn ask(topo: &Topology, vip: &'static str) -> std::io::Result<(String, String)> {
    Topology::within(&topo.client, move || {
        let addr: SocketAddr = vip.parse().unwrap();
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        let mut parts = line.split_whitespace();
        Ok((
            parts.next().unwrap_or("").into(),
            parts.next().unwrap_or("").into(),
        ))
    })
}

fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn node_proxy_in_namespaces_with_transparent_listeners() {
    node_proxy(&[]);
}

#[test]
fn node_proxy_in_namespaces_with_transparent_listeners_on_epoll() {
    node_proxy(&["--backend", "epoll"]);
}

#[test]
fn node_proxy_in_namespaces_with_a_listener_per_frontend() {
    node_proxy(&["--listeners", "per-frontend"]);
}

/// The node's set of steered IPv4 TCP frontends, as nft lists it.
fn steered_tcp4(topo: &Topology) -> String {
    let args = [
        "netns",
        "exec",
        &topo.node,
        "nft",
        "list",
        "set",
        "inet",
        "svcproxyd",
        "tcp4",
    ];
    output("ip", &args)
}

/// The node's listening TCP sockets, one `address:port` per line.
fn tcp_listeners(topo: &Topology) -> String {
    output(
        "ip",
        &[
            "netns",
            "exec",
            &topo.node,
            "ss",
            "-Hltn",
            "-o",
            "state",
            "listening",
        ],
    )
}

/// The node proxy's behaviour, with the daemon started with `mode` (its listeners and backend).
fn node_proxy(mode: &[&str]) {
    if !root() {
        return;
    }
    let _alone = alone();
    let transparent = !mode.contains(&"per-frontend");
    let topo = Topology::new();
    let _a = Pod::start(&topo.pods[0], "pod-a");
    let _b = Pod::start(&topo.pods[1], "pod-b");
    let dir: PathBuf = std::env::temp_dir().join(format!("svcproxyd-netns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("cluster.yaml");
    write(&config, &manifest(&["198.18.2.2", "198.18.3.2"], true));
    let d = Daemon::start(&topo.node, &config, mode);
    let steered = || steered_tcp4(&topo);
    let listening = tcp_listeners(&topo);
    if transparent {
        // Every service address is served by the transparent listener, steered by tproxy.
        assert!(listening.contains("127.0.0.1:10263"), "{listening}");
        assert!(!listening.contains("198.19.0."), "{listening}");
        let set = steered();
        assert!(
            set.contains("198.19.0.10 . 80") && set.contains("198.19.0.11 . 80"),
            "{set}"
        );
        // No address is put on the node, and a host daemon on a wildcard address does not
        // answer on service addresses at ports the services do not declare.
        let addrs = output("ip", &["-n", &topo.node, "addr"]);
        assert!(!addrs.contains("198.19.0."), "{addrs}");
        let host = Topology::within(&topo.node, || TcpListener::bind("0.0.0.0:2222").unwrap());
        let undeclared = ask(&topo, "198.19.0.10:2222");
        assert!(
            undeclared
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
            "{undeclared:?}"
        );
        drop(host);
    } else {
        assert!(listening.contains("198.19.0.10:80"), "{listening}");
        assert!(!listening.contains(":10263"), "{listening}");
    }

    // Round robin over both pods; connecting to the cluster IP works, so replies come from it;
    // without source preservation the pods see the node.
    let answers: Vec<(String, String)> = (0..4)
        .map(|_| ask(&topo, "198.19.0.10:80").unwrap())
        .collect();
    let pods: Vec<&str> = answers.iter().map(|(p, _)| p.as_str()).collect();
    assert!(
        pods.windows(2).all(|w| w[0] != w[1]),
        "round robin: {pods:?}"
    );
    assert!(
        answers
            .iter()
            .all(|(_, seen)| seen.starts_with("198.18.") && seen.ends_with(".1")),
        "{answers:?}"
    );

    // UDP: the reply comes from the cluster IP (a connected socket accepts nothing else).
    let udp = Topology::within(&topo.client, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.connect("198.19.0.10:53").unwrap();
        s.send(b"q").unwrap();
        let mut buf = [0u8; 64];
        let n = s.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    assert!(udp.starts_with("pod-"), "{udp}");

    // ClientIP affinity: one pod for every connection from this client.
    let sticky: Vec<String> = (0..4)
        .map(|_| ask(&topo, "198.19.0.11:80").unwrap().0)
        .collect();
    assert!(sticky.iter().all(|p| *p == sticky[0]), "{sticky:?}");

    // Removing an endpoint in the manifest moves traffic within a second.
    write(&config, &manifest(&["198.18.2.2"], true));
    let changed = Instant::now();
    wait("traffic to leave pod-b", || {
        (0..2).all(|_| ask(&topo, "198.19.0.10:80").is_ok_and(|(p, _)| p == "pod-a"))
    });
    assert!(
        changed.elapsed() < Duration::from_secs(1),
        "took {:?}",
        changed.elapsed()
    );

    // No endpoints: refused at once.
    write(&config, &manifest(&[], true));
    wait("refusal", || {
        ask(&topo, "198.19.0.10:80")
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    });
    if transparent {
        let set = steered();
        assert!(
            !set.contains("198.19.0.10 . 80") && set.contains("198.19.0.11 . 80"),
            "{set}"
        );
    }

    // Deleting the service: its cluster IP stops answering.
    write(&config, &manifest(&[], false));
    wait("the cluster IP to go", || {
        ask(&topo, "198.19.0.10:80")
            .is_err_and(|e| e.kind() != std::io::ErrorKind::ConnectionRefused)
    });
    assert!(
        ask(&topo, "198.19.0.11:80").is_ok(),
        "the other service still answers"
    );

    // Address hygiene: a host on the node's link that asks for a service address by ARP gets
    // no answer (kube-proxy's strictARP), though the node serves it when routed there.
    let link = format!("v{}i1", std::process::id());
    ip(&[
        "-n",
        &topo.client,
        "route",
        "add",
        "198.19.0.11/32",
        "dev",
        &link,
    ]);
    let on_link = ask(&topo, "198.19.0.11:80");
    let neighbour = output("ip", &["-n", &topo.client, "neigh", "show", "198.19.0.11"]);
    ip(&[
        "-n",
        &topo.client,
        "route",
        "del",
        "198.19.0.11/32",
        "dev",
        &link,
    ]);
    assert!(on_link.is_err(), "{on_link:?}");
    assert!(
        !neighbour.contains("lladdr"),
        "the node answered ARP: {neighbour}"
    );
    let arp_ignore = "/proc/sys/net/ipv4/conf/all/arp_ignore";
    let strict = Topology::within(&topo.node, move || {
        std::fs::read_to_string(arp_ignore).unwrap()
    });
    assert_eq!(
        strict.trim(),
        if transparent { "0" } else { "1" },
        "strictARP with addresses"
    );

    // A clean exit leaves no interface, address, rule or route behind.
    assert_eq!(d.stop(), 0);
    let links = output("ip", &["-n", &topo.node, "link"]);
    assert!(!links.contains("svcproxy0"), "{links}");
    let addrs = output("ip", &["-n", &topo.node, "addr"]);
    assert!(!addrs.contains("198.19.0."), "{addrs}");
    let restored = Topology::within(&topo.node, move || {
        std::fs::read_to_string(arp_ignore).unwrap()
    });
    assert_eq!(restored.trim(), "0", "the ARP setting is put back");

    // Client source preservation: the pods see the client pod's address.
    write(&config, &manifest(&["198.18.2.2", "198.18.3.2"], true));
    let d = Daemon::start(
        &topo.node,
        &config,
        &[mode, &["--preserve-client-ip"]].concat(),
    );
    for _ in 0..2 {
        let (_, seen) = ask(&topo, "198.19.0.10:80").unwrap();
        assert_eq!(seen, "198.18.1.2");
    }
    assert_eq!(d.stop(), 0);
    let rules = output("ip", &["-n", &topo.node, "rule"]);
    assert!(!rules.contains("0x5350"), "{rules}");
    let nft = output(
        "ip",
        &["netns", "exec", &topo.node, "nft", "list", "ruleset"],
    );
    assert!(!nft.contains("svcproxyd"), "{nft}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The pod that answered a TCP connection from the client pod to `vip`; `None` when the
/// connection failed or was closed unanswered.
fn served_by(topo: &Topology, vip: &'static str) -> Option<String> {
    ask(topo, vip)
        .ok()
        .map(|(pod, _)| pod)
        .filter(|p| !p.is_empty())
}

/// The pods that answered `n` connections to `vip` (an empty name when one was not served).
fn served_n(topo: &Topology, vip: &'static str, n: usize) -> std::collections::BTreeSet<String> {
    (0..n)
        .map(|_| served_by(topo, vip).unwrap_or_default())
        .collect()
}

fn pods(names: &[&str]) -> std::collections::BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// The node's manifest for [`traffic_policies_source_ranges_topology_and_dual_stack`]: whether
/// pod-a runs on this node (`node`), and the source ranges of the load balancer.
fn semantics_manifest(pod_a_here: bool, ranges: &str) -> String {
    let pod_a_node = if pod_a_here { "node" } else { "other" };
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: node, labels: {{topology.kubernetes.io/zone: z2}}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: local, namespace: shop}}\n\
         spec:\n  type: LoadBalancer\n  clusterIP: 198.19.0.20\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 31000\n\
         \x20 ports: [{{port: 80, targetPort: 8080, nodePort: 30080}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: local-x, namespace: shop, labels: {{kubernetes.io/service-name: local}}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n\
         - {{addresses: [198.18.2.2], nodeName: {pod_a_node}}}\n- {{addresses: [198.18.3.2], nodeName: other}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: ranged, namespace: shop}}\n\
         spec:\n  type: LoadBalancer\n  clusterIP: 198.19.0.21\n  loadBalancerSourceRanges: [{ranges}]\n\
         \x20 ports: [{{port: 80, targetPort: 8080}}]\n\
         status: {{loadBalancer: {{ingress: [{{ip: 198.19.5.1}}, {{ip: 198.19.5.2, ipMode: Proxy}}]}}}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: ranged-x, namespace: shop, labels: {{kubernetes.io/service-name: ranged}}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [198.18.2.2]}}]\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: zoned, namespace: shop}}\n\
         spec: {{clusterIP: 198.19.0.30, trafficDistribution: PreferSameZone, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: zoned-x, namespace: shop, labels: {{kubernetes.io/service-name: zoned}}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n\
         - {{addresses: [198.18.2.2], zone: z1, hints: {{forZones: [{{name: z1}}]}}}}\n\
         - {{addresses: [198.18.3.2], zone: z2, hints: {{forZones: [{{name: z2}}]}}}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: dual, namespace: shop}}\n\
         spec:\n  clusterIPs: [198.19.0.40, '2001:db8:19::40']\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n\
         \x20 ports: [{{port: 80, targetPort: 8080}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: dual-4, namespace: shop, labels: {{kubernetes.io/service-name: dual}}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [198.18.2.2]}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: dual-6, namespace: shop, labels: {{kubernetes.io/service-name: dual}}}}\n\
         addressType: IPv6\nports: [{{port: 8080}}]\nendpoints: [{{addresses: ['2001:db8:3::2']}}]\n"
    )
}

/// The health check node port's answer to the client pod: status and body.
fn health_check(topo: &Topology) -> (u16, serde_json::Value) {
    let (status, body) = Topology::within(&topo.client, || {
        common::http("198.18.1.1:31000".parse().unwrap(), "GET", "/", "", "")
    });
    (status, serde_json::from_str(&body).unwrap())
}

#[test]
fn traffic_policies_source_ranges_topology_and_dual_stack() {
    if !root() {
        return;
    }
    let _alone = alone();
    let topo = Topology::new();
    topo.add_ipv6();
    let _a = Pod::start(&topo.pods[0], "pod-a");
    let _b = Pod::start(&topo.pods[1], "pod-b");
    let dir: PathBuf =
        std::env::temp_dir().join(format!("svcproxyd-semantics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("cluster.yaml");
    write(&config, &semantics_manifest(false, "198.18.9.0/24"));
    let check = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stderr);
    assert!(
        check.status.success() && !said.contains("warning"),
        "{said}"
    );
    let d = Daemon::start(&topo.node, &config, &[]);

    // externalTrafficPolicy Local, no endpoint on this node: the node port does not forward
    // the outside client, and its health check says so.
    assert_eq!(served_n(&topo, "198.18.1.1:30080", 3), pods(&[""]));
    let (status, body) = health_check(&topo);
    assert_eq!(status, 503, "{body}");
    let expected = serde_json::json!({
        "service": {"namespace": "shop", "name": "local"},
        "localEndpoints": 0,
        "serviceProxyHealthy": true,
    });
    assert_eq!(body, expected);
    // A client on the node itself is inside the cluster: it reaches the Cluster endpoints.
    let from_node = Topology::within(&topo.node, || {
        let pod = || {
            let s = TcpStream::connect("127.0.0.1:30080").unwrap();
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).unwrap();
            line.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string()
        };
        (0..4)
            .map(|_| pod())
            .collect::<std::collections::BTreeSet<String>>()
    });
    assert_eq!(from_node, pods(&["pod-a", "pod-b"]));
    // The cluster IP follows the internal policy (Cluster): both pods.
    assert_eq!(
        served_n(&topo, "198.19.0.20:80", 4),
        pods(&["pod-a", "pod-b"])
    );

    // Source ranges: the client pod (198.18.1.2) is outside 198.18.9.0/24.
    assert_eq!(served_by(&topo, "198.19.5.1:80"), None);
    assert_eq!(
        served_by(&topo, "198.19.0.21:80").as_deref(),
        Some("pod-a"),
        "the cluster IP is not limited"
    );
    // An ingress of ipMode Proxy belongs to the load balancer: not captured here.
    let steered = steered_tcp4(&topo);
    assert!(
        steered.contains("198.19.5.1 . 80") && !steered.contains("198.19.5.2"),
        "{steered}"
    );

    // Zone hints: this node is in zone z2 (its Node object says), so only pod-b serves.
    assert_eq!(served_n(&topo, "198.19.0.30:80", 4), pods(&["pod-b"]));

    // Dual stack: each family's cluster IP reaches the endpoints of its family.
    assert_eq!(served_n(&topo, "198.19.0.40:80", 3), pods(&["pod-a"]));
    assert_eq!(served_n(&topo, "[2001:db8:19::40]:80", 3), pods(&["pod-b"]));

    // pod-a moves to this node, and the source ranges take in the client.
    write(&config, &semantics_manifest(true, "198.18.1.0/24"));
    wait("the node port to forward to pod-a", || {
        served_by(&topo, "198.18.1.1:30080").as_deref() == Some("pod-a")
    });
    assert_eq!(
        served_n(&topo, "198.18.1.1:30080", 4),
        pods(&["pod-a"]),
        "local only"
    );
    let (status, body) = health_check(&topo);
    assert_eq!(
        (status, &body["localEndpoints"]),
        (200, &serde_json::json!(1)),
        "{body}"
    );
    assert_eq!(served_by(&topo, "198.19.5.1:80").as_deref(), Some("pod-a"));

    assert_eq!(d.stop(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A network namespace of the test's own, deleted when dropped.
struct Namespace(String);

impl Namespace {
    fn new(name: &str) -> Self {
        let ns = Self(format!("svcd{}-{name}", std::process::id()));
        ip(&["netns", "add", &ns.0]);
        ns
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// The IPv4 addresses of 198.18.0.0/15 on any interface (in the calling thread's namespace).
fn test_addresses() -> std::collections::BTreeSet<std::net::IpAddr> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3)?.split('/').next()?.parse().ok())
        .filter(|ip: &std::net::IpAddr| matches!(ip, std::net::IpAddr::V4(v4) if v4.octets()[..2] == [198, 18]))
        .collect()
}

/// Whether `got` is `want`, and if not, what differs (a few addresses, not 10,000).
fn same(
    got: &std::collections::BTreeSet<std::net::IpAddr>,
    want: &std::collections::BTreeSet<std::net::IpAddr>,
) -> Result<(), String> {
    if got == want {
        return Ok(());
    }
    let missing: Vec<_> = want.difference(got).take(3).collect();
    let extra: Vec<_> = got.difference(want).take(3).collect();
    Err(format!(
        "{} addresses, {} wanted; missing {missing:?}..., extra {extra:?}...",
        got.len(),
        want.len()
    ))
}

/// Capture of 10,000 service addresses, in a namespace of the test's own: one `ip` process
/// puts them all on the interface (a dummy one, or the loopback one where the kernel has no
/// dummies; timed), a change of one address is applied as such, and dropping the capture
/// removes them.
#[test]
fn capture_puts_10k_addresses_on_the_interface_in_one_batch() {
    if !root() {
        return;
    }
    let ns = Namespace::new("capture");
    let (all, one) = Topology::within(&ns.0, || {
        let mut capture = svcproxyd::capture::Capture::new("svcproxy0", None, false).unwrap();
        let first = u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0));
        let wanted: std::collections::BTreeSet<std::net::IpAddr> = (0..10_000)
            .map(|i| std::net::Ipv4Addr::from(first + i).into())
            .collect();
        let started = Instant::now();
        capture.sync(wanted.clone(), std::iter::empty());
        let all = started.elapsed();
        same(&test_addresses(), &wanted).unwrap();
        same(capture.addresses(), &wanted).unwrap();
        let mut changed = wanted.clone();
        changed.remove(&std::net::Ipv4Addr::from(first).into());
        changed.insert(std::net::Ipv4Addr::new(198, 18, 100, 1).into());
        let started = Instant::now();
        capture.sync(changed.clone(), std::iter::empty());
        let one = started.elapsed();
        same(&test_addresses(), &changed).unwrap();
        drop(capture);
        same(&test_addresses(), &Default::default()).unwrap();
        (all, one)
    });
    eprintln!("capture: 10,000 addresses in {all:?}, then a change of one in {one:?}");
}

/// A request to the admin endpoint of the daemon in `ns`; the response's status.
fn admin(ns: &str, method: &'static str, path: String, body: String) -> u16 {
    let addr: SocketAddr = "127.0.0.1:10262".parse().unwrap();
    Topology::within(ns, move || common::http(addr, method, &path, "", &body).0)
}

/// Connects to each of `addresses` in turn and reads a line: how many answered.
fn answering(ns: &str, addresses: Vec<SocketAddr>) -> usize {
    Topology::within(ns, move || {
        addresses
            .iter()
            .filter(|addr| {
                TcpStream::connect_timeout(addr, Duration::from_secs(1))
                    .and_then(|s| {
                        s.set_read_timeout(Some(Duration::from_secs(2)))?;
                        let mut line = String::new();
                        BufReader::new(s).read_line(&mut line)?;
                        Ok(line.starts_with("pod-"))
                    })
                    .unwrap_or(false)
            })
            .count()
    })
}

/// Descriptors the process `pid` holds.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The address of service `i` of the scale test: 198.18.1.0 onwards.
fn scale_address(i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 1, 0)) + i as u32)
}

/// 10,000 ClusterIP services (one TCP port and one endpoint each; `SVCPROXY_SCALE_SERVICES`
/// sets another count) in a namespace of the test's own, with 2 workers and transparent
/// listeners: every service answers, the daemon holds under 1,000 descriptors, a service added
/// and then emptied through the admin API reaches the data path while the others keep
/// serving, and a clean exit leaves no address or rule behind. Prints the times (recorded in
/// docs/BENCHMARKS.md); asserts no time.
#[test]
fn ten_thousand_services_are_all_served_with_few_descriptors() {
    if !root() {
        return;
    }
    let _alone = alone();
    let count: usize = std::env::var("SVCPROXY_SCALE_SERVICES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let ns = Namespace::new("scale");
    ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
    // The clients are local: they need a route to the service addresses (on a node, the
    // default route) for a source address.
    ip(&[
        "-n",
        &ns.0,
        "route",
        "add",
        "198.18.0.0/15",
        "dev",
        "lo",
        "src",
        "127.0.0.1",
    ]);
    let _pod = Pod::start(&ns.0, "pod-a");
    let dir = std::env::temp_dir().join(format!("svcproxyd-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("services.toml");
    let mut toml = String::from("[proxy]\nworkers = 2\n");
    for i in 0..count {
        toml += &format!(
            "\n[[services]]\nname = \"default/s{i}\"\naddresses = [\"{}\"]\nports = [{{ port = 80, target_port = 8080 }}]\nendpoints = [{{ address = \"127.0.0.1\" }}]\n",
            scale_address(i)
        );
    }
    write(&config, &toml);
    let all: Vec<SocketAddr> = (0..count)
        .map(|i| SocketAddr::from((scale_address(i), 80)))
        .collect();

    let started = Instant::now();
    let d = Daemon::start(&ns.0, &config, &[]);
    // Served once the last service answers (the services are published in one batch).
    wait_long("the last service", || {
        answering(&ns.0, vec![*all.last().unwrap()]) == 1
    });
    let served = started.elapsed();
    let probed = Instant::now();
    assert_eq!(
        answering(&ns.0, all.clone()),
        count,
        "every service answers"
    );
    let probe = probed.elapsed();
    let fds = descriptors(d.0.id());
    assert!(fds < 1000, "{fds} descriptors for {count} services");

    // A service added through the admin API, then left without endpoints.
    let extra = SocketAddr::from(([198, 19, 255, 1], 80));
    let put = |endpoints: &str| {
        let body = format!(
            "{{\"name\": \"default/extra\", \"addresses\": [\"{}\"], \"ports\": [{{\"port\": 80, \"target_port\": 8080}}], \"endpoints\": [{endpoints}]}}",
            extra.ip()
        );
        assert_eq!(
            admin(&ns.0, "PUT", "/services/default/extra".into(), body),
            200
        );
    };
    let changed = Instant::now();
    put("{\"address\": \"127.0.0.1\"}");
    let ms = Duration::from_millis(1);
    wait_every("the added service", ms, || {
        answering(&ns.0, vec![extra]) == 1
    });
    let added = changed.elapsed();
    let changed = Instant::now();
    put("");
    wait_every("the emptied service to refuse", ms, || {
        Topology::within(&ns.0, move || {
            TcpStream::connect_timeout(&extra, Duration::from_secs(1))
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        })
    });
    let emptied = changed.elapsed();
    let sample: Vec<SocketAddr> = all.iter().step_by((count / 100).max(1)).copied().collect();
    assert_eq!(
        answering(&ns.0, sample.clone()),
        sample.len(),
        "the others still answer"
    );
    let rss = std::fs::read_to_string(format!("/proc/{}/status", d.0.id()))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .unwrap_or("")
        .to_string();
    eprintln!(
        "{count} services: all served {served:?} after start; {fds} descriptors; {rss}; \
         probing every service took {probe:?}; an added service answered after {added:?}, \
         an emptied one refused after {emptied:?}"
    );

    assert_eq!(d.stop(), 0);
    let addrs = output("ip", &["-n", &ns.0, "addr"]);
    assert!(!addrs.contains("198.18.1."), "addresses left behind");
    let nft = output("ip", &["netns", "exec", &ns.0, "nft", "list", "ruleset"]);
    assert!(!nft.contains("svcproxyd"), "{nft}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// As [`wait`], for up to three minutes (starting with 50,000 services takes a while).
fn wait_long(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_takeover_hands_the_capture_and_the_flows_over_with_transparent_listeners() {
    takeover_in_namespaces(&[]);
}

#[test]
fn a_takeover_hands_the_capture_and_the_flows_over_with_a_listener_per_frontend() {
    takeover_in_namespaces(&["--listeners", "per-frontend"]);
}

/// What capture leaves on the node: the nftables table, addresses, policy rules and routes,
/// and the ARP settings.
fn node_state(topo: &Topology) -> String {
    let run = |args: &[&str]| {
        let mut all = vec!["netns", "exec", &topo.node];
        all.extend(args);
        output("ip", &all)
    };
    // Link-local addresses come and go on their own (duplicate address detection).
    let addresses: String = run(&["ip", "-o", "address"])
        .lines()
        .filter(|l| !l.contains("scope link"))
        .map(|l| format!("{l}\n"))
        .collect();
    [
        run(&["nft", "list", "table", "inet", "svcproxyd"]),
        addresses,
        run(&["ip", "rule"]),
        run(&["ip", "route", "show", "table", "53535"]),
        run(&[
            "sysctl",
            "net.ipv4.conf.all.arp_ignore",
            "net.ipv4.conf.all.arp_announce",
        ]),
    ]
    .join("\n")
}

/// A new svcproxyd takes over from a running one in the node (capture mode `mode`): the node
/// keeps its capture as it was (never removed and added again), UDP flows keep their pod, and
/// the old daemon exits 0.
fn takeover_in_namespaces(mode: &[&str]) {
    if !root() {
        return;
    }
    let _alone = alone();
    let topo = Topology::new();
    let _a = Pod::start(&topo.pods[0], "pod-a");
    let _b = Pod::start(&topo.pods[1], "pod-b");
    let dir = std::env::temp_dir().join(format!("svcproxyd-netns-takeover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("cluster.yaml");
    write(&config, &manifest(&["198.18.2.2", "198.18.3.2"], true));
    let socket = dir.join("run/upgrade.sock");
    let mut args = vec!["--upgrade-socket", socket.to_str().unwrap()];
    args.extend(mode);
    let mut old = Daemon::start(&topo.node, &config, &args);

    let clients: Vec<UdpSocket> = Topology::within(&topo.client, || {
        (0..6)
            .map(|_| {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                s.connect("198.19.0.10:53").unwrap();
                s
            })
            .collect()
    });
    let answer = |s: &UdpSocket| {
        s.send(b"q").unwrap();
        let mut buf = [0u8; 64];
        let n = s.recv(&mut buf).expect("an answer through the node");
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        text.split_whitespace().next().unwrap_or("").to_string()
    };
    let before: Vec<String> = clients.iter().map(answer).collect();
    assert_eq!(
        before
            .iter()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        pods(&["pod-a", "pod-b"]),
        "round robin over the flows"
    );
    let state = node_state(&topo);
    assert!(state.contains("198.19.0.10"), "{state}");

    // A new daemon that fails after receiving the sockets and the capture (its metrics
    // address is taken) leaves the capture as it was, and the old daemon serving each flow.
    let taken = Topology::within(&topo.node, || TcpListener::bind("127.0.0.1:0").unwrap());
    let metrics = taken.local_addr().unwrap().to_string();
    let mut failing = args.clone();
    failing.extend(["--metrics", metrics.as_str()]);
    let mut failed = Daemon::spawn(&topo.node, &config, &failing);
    wait("the failing daemon to exit", || {
        failed.0.try_wait().unwrap().is_some()
    });
    assert_eq!(failed.0.wait().unwrap().code(), Some(1));
    assert_eq!(
        node_state(&topo),
        state,
        "the failed daemon left the capture alone"
    );
    let again: Vec<String> = clients.iter().map(answer).collect();
    assert_eq!(again, before, "the old daemon serves each flow on");

    let new = Daemon::start(&topo.node, &config, &args);
    wait("the old daemon to hand over and exit", || {
        old.0.try_wait().unwrap().is_some()
    });
    assert_eq!(old.0.wait().unwrap().code(), Some(0));
    assert_eq!(
        node_state(&topo),
        state,
        "the capture is handed over as it was"
    );
    let after: Vec<String> = clients.iter().map(answer).collect();
    assert_eq!(after, before, "each flow stays with its pod");
    assert!(ask(&topo, "198.19.0.10:80").is_ok(), "TCP is served");

    assert_eq!(new.stop(), 0);
    assert!(
        !node_state(&topo).contains("198.19.0.10"),
        "the new daemon removes the capture when it exits"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Lines a shell prints from the client namespace, as a process of `cgroup`: it joins the
/// cgroup before entering the namespace (`ip netns exec` remounts /sys).
fn in_cgroup(cgroup: &Path, ns: &str, script: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$1/cgroup.procs" && exec ip netns exec "$2" bash -c "$3""#)
        .arg("sh")
        .arg(cgroup)
        .arg(ns)
        .arg(script)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn healthz(topo: &Topology) -> serde_json::Value {
    let (_, body) = Topology::within(&topo.node, || {
        common::http(
            "127.0.0.1:10256".parse().unwrap(),
            "GET",
            "/healthz",
            "",
            "",
        )
    });
    serde_json::from_str(&body).unwrap()
}

#[test]
fn socket_level_load_balancing_from_svcproxyd() {
    if !root() {
        return;
    }
    let _alone = alone();
    let topo = Topology::new();
    let _a = Pod::start(&topo.pods[0], "pod-a");
    let _b = Pod::start(&topo.pods[1], "pod-b");
    let dir: PathBuf =
        std::env::temp_dir().join(format!("svcproxyd-socklb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("cluster.yaml");
    write(&config, &manifest(&["198.18.2.2", "198.18.3.2"], true));
    let cgroup = topology::Cgroup::new();
    let path = cgroup.0.to_str().unwrap();
    let d = Daemon::start(&topo.node, &config, &["--socket-lb-cgroup", path]);
    let health = healthz(&topo);
    assert_eq!(health["socketLb"]["cgroup"], path, "{health}");
    assert_eq!(
        health["socketLb"]["frontends"], 3,
        "web:80, web:53 and sticky:80: {health}"
    );

    // Clients in the cgroup reach the pods straight: each pod sees the client's own address
    // (through the proxy it would see the node's), in round robin.
    let script =
        "for i in 1 2 3 4; do exec 3<>/dev/tcp/198.19.0.10/80; head -1 <&3; exec 3<&-; done";
    let answers = in_cgroup(&cgroup.0, &topo.client, script);
    let lines: Vec<&str> = answers.lines().collect();
    assert_eq!(
        lines,
        [
            "pod-a 198.18.1.2",
            "pod-b 198.18.1.2",
            "pod-a 198.18.1.2",
            "pod-b 198.18.1.2"
        ],
        "{answers}"
    );
    // A client outside the cgroup goes through the proxy.
    let (_, seen) = ask(&topo, "198.19.0.10:80").unwrap();
    assert_ne!(seen, "198.18.1.2");
    // The socket's connections are in /metrics with the proxy's.
    let (_, metrics) = Topology::within(&topo.node, || {
        common::http(
            "127.0.0.1:10249".parse().unwrap(),
            "GET",
            "/metrics",
            "",
            "",
        )
    });
    let web: u64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("svcproxy_connections_total{")
                && l.contains("service=\"shop/web\"")
                && l.contains("port=\"http\"")
        })
        .filter_map(|l| l.rsplit(" ").next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(
        web, 5,
        "four at the socket, one through the proxy:\n{metrics}"
    );
    assert_eq!(d.stop(), 0);
    let attached = output("bpftool", &["cgroup", "show", path]);
    assert_eq!(attached.trim(), "", "svcproxyd detached on exit");

    // Where the programs cannot attach (not a cgroup), svcproxyd says so and serves on.
    let d = Daemon::start(
        &topo.node,
        &config,
        &["--socket-lb-cgroup", dir.to_str().unwrap()],
    );
    let health = healthz(&topo);
    let error = health["socketLb"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("attaching connect4"), "{health}");
    assert_eq!(
        ask(&topo, "198.19.0.10:80").unwrap().0.len(),
        5,
        "pod-a or pod-b"
    );
    assert_eq!(d.stop(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}
