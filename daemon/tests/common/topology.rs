//! Network namespaces for the tests that need them (root only): a client pod and two backend
//! pods, each joined to a node namespace by a veth pair. Addresses come from 198.18.0.0/15:
//! client 198.18.1.2, pods 198.18.2.2 and 198.18.3.2, the node 198.18.{1,2,3}.1. Everything
//! made is removed when dropped.

// Each suite that includes this module uses a part of it.
#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2 is installed");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces and links; removed when dropped.
pub struct Topology {
    pub client: String,
    pub node: String,
    pub pods: [String; 2],
}

impl Topology {
    pub fn new() -> Self {
        let id = std::process::id();
        let t = Self {
            client: format!("svcd{id}-client"),
            node: format!("svcd{id}-node"),
            pods: [format!("svcd{id}-a"), format!("svcd{id}-b")],
        };
        for ns in [&t.client, &t.node, &t.pods[0], &t.pods[1]] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let links = [(&t.client, 1), (&t.pods[0], 2), (&t.pods[1], 3)];
        for (ns, net) in links {
            let (inner, outer) = (format!("v{id}i{net}"), format!("v{id}o{net}"));
            ip(&[
                "link", "add", &inner, "netns", ns, "type", "veth", "peer", "name", &outer,
                "netns", &t.node,
            ]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("198.18.{net}.2/24"),
                "dev",
                &inner,
            ]);
            ip(&[
                "-n",
                &t.node,
                "addr",
                "add",
                &format!("198.18.{net}.1/24"),
                "dev",
                &outer,
            ]);
            ip(&["-n", ns, "link", "set", &inner, "up"]);
            ip(&["-n", &t.node, "link", "set", &outer, "up"]);
            ip(&[
                "-n",
                ns,
                "route",
                "add",
                "default",
                "via",
                &format!("198.18.{net}.1"),
            ]);
        }
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &t.node,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        t
    }

    /// Gives every link IPv6 addresses too: 2001:db8:{1,2,3}::2 in the client and the pods,
    /// 2001:db8:{1,2,3}::1 on the node, which routes between them.
    pub fn add_ipv6(&self) {
        let id = std::process::id();
        let links = [(&self.client, 1), (&self.pods[0], 2), (&self.pods[1], 3)];
        for (ns, net) in links {
            let (inner, outer) = (format!("v{id}i{net}"), format!("v{id}o{net}"));
            let addr = |host: u8| format!("2001:db8:{net}::{host}/64");
            ip(&["-n", ns, "addr", "add", &addr(2), "dev", &inner, "nodad"]);
            ip(&[
                "-n",
                &self.node,
                "addr",
                "add",
                &addr(1),
                "dev",
                &outer,
                "nodad",
            ]);
            let gateway = format!("2001:db8:{net}::1");
            ip(&["-n", ns, "-6", "route", "add", "default", "via", &gateway]);
        }
        let out = Command::new("ip")
            .args(["netns", "exec", &self.node, "sysctl", "-qw"])
            .arg("net.ipv6.conf.all.forwarding=1")
            .output()
            .unwrap();
        assert!(out.status.success());
    }

    /// Runs `f` on a thread inside namespace `ns`.
    pub fn within<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{ns}");
        std::thread::spawn(move || {
            let file = File::open(path).unwrap();
            rustix::thread::move_into_link_name_space(
                file.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.client, &self.node, &self.pods[0], &self.pods[1]] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A pod's servers: TCP 8080 and UDP 5353, on both families, answer "<pod> <client address>".
pub struct Pod {
    ns: String,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Pod {
    pub fn start(ns: &str, name: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tcp, udp) = Topology::within(ns, || {
            let tcp = TcpListener::bind("[::]:8080").unwrap();
            let udp = UdpSocket::bind("[::]:5353").unwrap();
            (tcp, udp)
        });
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let s1 = stop.clone();
        let t1 = std::thread::spawn(move || {
            // Blocking: a client is answered at once; Drop connects once to end the loop.
            while let Ok((mut c, peer)) = tcp.accept() {
                if s1.load(Ordering::SeqCst) {
                    break;
                }
                let _ = writeln!(c, "{name} {}", peer.ip().to_canonical());
            }
        });
        let s2 = stop.clone();
        let t2 = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !s2.load(Ordering::SeqCst) {
                if let Ok((_, from)) = udp.recv_from(&mut buf) {
                    let seen = from.ip().to_canonical();
                    let _ = udp.send_to(format!("{name} {seen}").as_bytes(), from);
                }
            }
        });
        Self {
            ns: ns.to_string(),
            stop,
            threads: vec![t1, t2],
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = Topology::within(&self.ns, || TcpStream::connect("127.0.0.1:8080"));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A cgroup v2 directory of the test's own (for the socket-level load balancing tests),
/// removed when dropped; whoever put processes in it must have ended them.
pub struct Cgroup(pub PathBuf);

impl Cgroup {
    pub fn new() -> Self {
        let mount = svcproxy::socket_lb::cgroup2_mount().expect("cgroup v2 is mounted");
        let path = mount.join(format!("svcproxy-test-{}", std::process::id()));
        std::fs::create_dir(&path).unwrap();
        Cgroup(path)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Serializes the tests that build the namespaces (named after this process).
pub fn alone() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn root() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "this test must run as root under CI"
    );
    eprintln!("skipped: network namespaces need root");
    false
}
