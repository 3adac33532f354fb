//! The candidates: what sits between the client and the backends. Each is started fresh for
//! its workloads and stopped after them. Proxies run as their own processes (so their memory
//! and CPU are theirs alone), with the same number of worker threads.

use std::io::{self, BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::backends::{ECHO_PORT, HTTP_PORT, SINK_PORT, TCP_SERVICES, TRANSPARENT_PORT, UDP_PORT};
use crate::load::Target;
use crate::topo::{Topology, run};

/// What a candidate child prints once it serves.
pub const READY: &str = "SVCBENCH-READY";

/// Another build of this harness (`--baseline`), whose svcproxy runs as the `base-*`
/// candidates: the same workloads through the code before and after a change, in one run.
pub static BASELINE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Svcproxy(&'static str),
    /// svcproxy of the [`BASELINE`] build; the name is `base-` and the backend mode.
    Baseline(&'static str),
    Tokio,
    Haproxy,
    Nginx,
    Dnat,
}

impl Kind {
    pub fn name(self) -> String {
        match self {
            Kind::Direct => "direct (no proxy)".into(),
            Kind::Svcproxy(b) => format!("svcproxy {b}"),
            Kind::Baseline(b) => format!("svcproxy {} (baseline)", mode(b)),
            Kind::Tokio => "tokio copy_bidirectional".into(),
            Kind::Haproxy => "HAProxy (splice-auto)".into(),
            Kind::Nginx => "nginx stream".into(),
            Kind::Dnat => "kernel DNAT (nftables)".into(),
        }
    }

    /// Whether it forwards UDP.
    pub fn udp(self) -> bool {
        !matches!(self, Kind::Tokio | Kind::Haproxy)
    }

    /// Whether it runs as a process of its own (and so has memory to measure).
    pub fn process(self) -> bool {
        !matches!(self, Kind::Direct | Kind::Dnat)
    }
}

/// A started candidate; stopped when dropped.
pub struct Running {
    pub target: Target,
    child: Option<Child>,
    nft_cleanup: Option<&'static str>,
    /// The `socket-lb` candidate's cgroup, which this process (the load's clients) is in
    /// while the candidate runs.
    cgroup: Option<BenchCgroup>,
}

/// A cgroup v2 directory of the harness's own, with the harness in it; the harness goes back
/// where it was, and the directory is removed, when dropped (after the candidate stopped).
struct BenchCgroup {
    dir: PathBuf,
    home: PathBuf,
}

impl BenchCgroup {
    fn new() -> io::Result<Self> {
        let mount = svcproxy::socket_lb::cgroup2_mount()?;
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let home = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(|p| mount.join(p.trim_start_matches('/')))
            .ok_or_else(|| io::Error::other("not in a cgroup v2 hierarchy"))?;
        let dir = mount.join(format!("svcbench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir, home })
    }

    fn enter(&self) -> io::Result<()> {
        std::fs::write(
            self.dir.join("cgroup.procs"),
            std::process::id().to_string(),
        )
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.home.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        let _ = std::fs::remove_dir(&self.dir);
    }
}

impl Running {
    /// Every process of the candidate (its own and its children), for memory accounting.
    pub fn pids(&self) -> Vec<u32> {
        let Some(child) = &self.child else {
            return Vec::new();
        };
        let mut pids = vec![child.id()];
        // `nsenter` execs, so the child is the program itself; nginx forks workers.
        let mut i = 0;
        while i < pids.len() {
            let parent = pids[i];
            if let Ok(dir) = std::fs::read_dir("/proc") {
                for e in dir.flatten() {
                    let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                        continue;
                    };
                    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                        let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
                        if after.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok())
                            == Some(parent)
                            && !pids.contains(&pid)
                        {
                            pids.push(pid);
                        }
                    }
                }
            }
            i += 1;
        }
        pids
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(child.id() as i32).expect("child pid"),
                rustix::process::Signal::TERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(ns) = self.nft_cleanup {
            unsteer(ns);
        }
    }
}

/// Removes the harness's nftables table (kernel DNAT's rules, or the tproxy steering).
fn unsteer(ns: &str) {
    let _ = run(
        "ip",
        &[
            "netns", "exec", ns, "nft", "delete", "table", "ip", "svcbench",
        ],
    );
}

/// Steers the proxy address's ports to svcproxy's transparent listeners (tproxy), in the
/// client namespace where the candidate runs; returns that namespace.
fn steer(topo: &Topology, dir: &Path) -> io::Result<&'static str> {
    let ns = topo.client_ns().ok_or_else(|| {
        io::Error::other("transparent listeners need the namespace topology (root)")
    })?;
    let ip = topo.proxy_ip;
    let rules = format!(
        "table ip svcbench {{\n  chain steer {{\n    type filter hook prerouting priority mangle; policy accept;\n\
         \x20   ip daddr {ip} tcp dport {{ {ECHO_PORT}, {SINK_PORT}, {HTTP_PORT} }} tproxy to 127.0.0.1:{TRANSPARENT_PORT} accept\n\
         \x20   ip daddr {ip} udp dport {UDP_PORT} tproxy to 127.0.0.1:{TRANSPARENT_PORT} accept\n  }}\n}}\n"
    );
    let file = dir.join("steer.nft");
    std::fs::write(&file, rules)?;
    run(
        "ip",
        &["netns", "exec", ns, "nft", "-f", &file.to_string_lossy()],
    )?;
    Ok(ns)
}

/// The backend mode of a candidate's name (`base-uring` is `uring` of the baseline build).
fn mode(name: &'static str) -> &'static str {
    name.strip_prefix("base-").unwrap_or(name)
}

fn addrs(ips: &[IpAddr], port: u16) -> Vec<SocketAddr> {
    ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect()
}

fn proxy_target(topo: &Topology) -> Target {
    Target {
        echo: vec![SocketAddr::new(topo.proxy_ip, ECHO_PORT)],
        sink: vec![SocketAddr::new(topo.proxy_ip, SINK_PORT)],
        udp: vec![SocketAddr::new(topo.proxy_ip, UDP_PORT)],
        http: vec![SocketAddr::new(topo.proxy_ip, HTTP_PORT)],
    }
}

/// Starts `kind`; `dir` holds its config files.
/// Starts `kind`; `dir` holds its config files; `connections` is how many proxied
/// connections it must be able to hold at once (its descriptor budget follows from it).
pub fn start(
    kind: Kind,
    topo: &Topology,
    workers: usize,
    connections: usize,
    dir: &Path,
) -> io::Result<Running> {
    let backends = &topo.backend_ips;
    match kind {
        Kind::Direct => Ok(Running {
            target: Target {
                echo: addrs(backends, ECHO_PORT),
                sink: addrs(backends, SINK_PORT),
                udp: addrs(backends, UDP_PORT),
                http: addrs(backends, HTTP_PORT),
            },
            child: None,
            nft_cleanup: None,
            cgroup: None,
        }),
        Kind::Dnat => {
            let (ns, vip) = match (topo.client_ns(), topo.vip) {
                (Some(ns), Some(vip)) => (ns, vip),
                _ => {
                    return Err(io::Error::other(
                        "kernel DNAT needs the namespace topology (root)",
                    ));
                }
            };
            let map: Vec<String> = backends
                .iter()
                .enumerate()
                .map(|(i, ip)| format!("{i} : {ip}"))
                .collect();
            let rules = format!(
                "table ip svcbench {{\n  chain out {{\n    type nat hook output priority -100; policy accept;\n    ip daddr {vip} dnat to numgen inc mod {} map {{ {} }}\n  }}\n}}\n",
                backends.len(),
                map.join(", ")
            );
            let file = dir.join("dnat.nft");
            std::fs::write(&file, rules)?;
            run(
                "ip",
                &["netns", "exec", ns, "nft", "-f", &file.to_string_lossy()],
            )?;
            Ok(Running {
                target: Target {
                    echo: vec![SocketAddr::new(vip, ECHO_PORT)],
                    sink: vec![SocketAddr::new(vip, SINK_PORT)],
                    udp: vec![SocketAddr::new(vip, UDP_PORT)],
                    http: vec![SocketAddr::new(vip, HTTP_PORT)],
                },
                child: None,
                nft_cleanup: Some(ns),
                cgroup: None,
            })
        }
        Kind::Svcproxy(name) | Kind::Baseline(name) => {
            let exe = match kind {
                Kind::Baseline(_) => BASELINE
                    .get()
                    .cloned()
                    .ok_or_else(|| io::Error::other("no --baseline build given"))?,
                _ => std::env::current_exe()?,
            };
            let backend = mode(name);
            let nft_cleanup = match backend.ends_with("-tproxy") {
                true => Some(steer(topo, dir)?),
                false => None,
            };
            let mut cmd = topo.command_in_client(&exe.to_string_lossy());
            cmd.args([
                "serve-svcproxy",
                "--backend",
                backend,
                "--workers",
                &workers.to_string(),
            ]);
            cmd.args(["--listen", &topo.proxy_ip.to_string()]);
            for ip in backends {
                cmd.args(["--endpoint", &ip.to_string()]);
            }
            // `socket-lb`: the load's clients (this process) connect straight to the backends.
            let cgroup = match backend == "socket-lb" {
                true => Some(BenchCgroup::new()?),
                false => None,
            };
            if let Some(c) = &cgroup {
                cmd.arg("--socket-lb").arg(&c.dir);
            }
            match spawn_ready(cmd, proxy_target(topo)) {
                Ok(mut running) => {
                    running.nft_cleanup = nft_cleanup;
                    if let Some(c) = &cgroup {
                        c.enter()?;
                    }
                    running.cgroup = cgroup;
                    Ok(running)
                }
                Err(e) => {
                    nft_cleanup.map(unsteer);
                    Err(e)
                }
            }
        }
        Kind::Tokio => {
            let exe = std::env::current_exe()?;
            let mut cmd = topo.command_in_client(&exe.to_string_lossy());
            cmd.args(["serve-tokio", "--workers", &workers.to_string()]);
            cmd.args(["--listen", &topo.proxy_ip.to_string()]);
            for ip in backends {
                cmd.args(["--endpoint", &ip.to_string()]);
            }
            spawn_ready(cmd, proxy_target(topo))
        }
        Kind::Haproxy => {
            let servers = |port: u16| -> String {
                backends
                    .iter()
                    .enumerate()
                    .map(|(i, ip)| format!("  server b{i} {ip}:{port}\n"))
                    .collect()
            };
            let listen = |name: &str, port: u16| {
                format!(
                    "listen {name}\n  bind {}:{port}\n  balance roundrobin\n{}",
                    topo.proxy_ip,
                    servers(port)
                )
            };
            let listens: Vec<String> = TCP_SERVICES
                .iter()
                .map(|(name, port)| listen(name, *port))
                .collect();
            let cfg = format!(
                "global\n  nbthread {workers}\n  maxconn {}\n  maxpipes 1000\n\ndefaults\n  mode tcp\n  option splice-auto\n  timeout connect 5s\n  timeout client 5m\n  timeout server 5m\n\n{}",
                connections + 200,
                listens.join("\n")
            );
            let file = dir.join("haproxy.cfg");
            std::fs::write(&file, cfg)?;
            let mut cmd = topo.command_in_client("haproxy");
            cmd.args(["-db", "-f", &file.to_string_lossy()]);
            spawn_listening(cmd, topo, proxy_target(topo))
        }
        Kind::Nginx => {
            let upstream = |name: &str, port: u16| -> String {
                let servers: String = backends
                    .iter()
                    .map(|ip| format!("    server {ip}:{port};\n"))
                    .collect();
                format!("  upstream {name} {{\n{servers}  }}\n")
            };
            let cfg = format!(
                "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
                 worker_processes {workers};\nworker_rlimit_nofile {nofile};\ndaemon off;\n\
                 pid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
                 events {{ worker_connections {per_worker}; }}\n\
                 stream {{\n{tcp}{}\
                 \x20 server {{ listen {ip}:{UDP_PORT} udp reuseport; proxy_pass udp; proxy_responses 1; proxy_timeout 5s; }}\n}}\n",
                upstream("udp", UDP_PORT),
                tcp = TCP_SERVICES
                    .iter()
                    .map(|(name, port)| format!(
                        "{}  server {{ listen {ip}:{port}; proxy_pass {name}; }}\n",
                        upstream(name, *port),
                        ip = topo.proxy_ip
                    ))
                    .collect::<String>(),
                dir = dir.display(),
                ip = topo.proxy_ip,
                nofile = crate::serve::nofile(),
                per_worker = 2 * connections + 100,
            );
            let file = dir.join("nginx.conf");
            std::fs::write(&file, cfg)?;
            let mut cmd = topo.command_in_client("nginx");
            cmd.args(["-c", &file.to_string_lossy(), "-p", &dir.to_string_lossy()]);
            spawn_listening(cmd, topo, proxy_target(topo))
        }
    }
}

/// Starts a child that prints [`READY`] once it serves.
fn spawn_ready(mut cmd: std::process::Command, target: Target) -> io::Result<Running> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).spawn()?;
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line)? == 0 {
            let _ = child.wait();
            return Err(io::Error::other("candidate exited before serving"));
        }
        if line.contains(READY) {
            break;
        }
    }
    Ok(Running {
        target,
        child: Some(child),
        nft_cleanup: None,
        cgroup: None,
    })
}

/// Starts a third-party proxy and waits until its TCP port accepts (it has no readiness signal).
fn spawn_listening(
    mut cmd: std::process::Command,
    topo: &Topology,
    target: Target,
) -> io::Result<Running> {
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).spawn()?;
    let running = Running {
        target,
        child: Some(child),
        nft_cleanup: None,
        cgroup: None,
    };
    wait_listening(topo.client_ns(), vec![running.target.echo[0]]).map(|()| running)
}

/// Waits (10 s at most) until every one of `addrs` accepts connections from namespace `ns`:
/// for programs with no readiness signal.
pub fn wait_listening(ns: Option<&'static str>, addrs: Vec<SocketAddr>) -> io::Result<()> {
    std::thread::spawn(move || -> io::Result<()> {
        crate::topo::enter(ns)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        for addr in addrs {
            loop {
                match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        Ok(())
    })
    .join()
    .map_err(|_| io::Error::other("probe panicked"))?
}

/// A scratch directory for config files, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> io::Result<Self> {
        let dir = std::env::temp_dir().join(format!("svcbench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
