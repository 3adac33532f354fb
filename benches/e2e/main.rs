//! End-to-end benchmark: the same workloads, side by side in one run, through no proxy, svcproxy,
//! a tokio `copy_bidirectional` proxy, HAProxy, nginx and kernel DNAT (whichever are available),
//! printed as a Markdown table with ratios to HAProxy and to kernel DNAT.
//!
//! Run: `cargo bench --bench e2e` (as root for the namespace topology and kernel DNAT; any user
//! gets the loopback topology). Options after `--`: `--duration SECS`, `--workloads a,b`,
//! `--candidates a,b`, `--out FILE`, `--quick`, `--baseline PATH` (another build of this
//! harness, e.g. of the commit before a change: its svcproxy joins as `base-epoll`,
//! `base-uring`, ...).

mod backends;
mod candidates;
mod load;
mod serve;
mod topo;
mod usage;
mod web;

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};

use candidates::{Kind, Running};
use topo::Topology;
use usage::Usage;

#[derive(Parser)]
#[command(about = "svcproxy end-to-end benchmark")]
struct Cli {
    #[command(subcommand)]
    serve: Option<Serve>,
    /// Seconds each workload is measured for.
    #[arg(long, default_value_t = 4.0)]
    duration: f64,
    /// Workloads to run: bulk1, bulk8, rr, cps, wrk-rr, wrk-cps, idle, udp64, udp1400,
    /// udp64-flood.
    #[arg(long, value_delimiter = ',')]
    workloads: Option<Vec<String>>,
    /// Candidates: direct, epoll, uring, uring-splice, uring-sqpoll, tokio, haproxy, nginx,
    /// dnat, epoll-tproxy, uring-tproxy (transparent listeners; namespaces only), socket-lb
    /// (cgroup BPF; namespaces only).
    #[arg(long, value_delimiter = ',')]
    candidates: Option<Vec<String>>,
    /// Also write the report to this file.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// A short run (for CI): 0.5 s per workload, 500 idle connections.
    #[arg(long)]
    quick: bool,
    /// Force the loopback topology even as root.
    #[arg(long)]
    loopback: bool,
    /// Worker threads of every proxy alike (svcproxy's workers, HAProxy's nbthread, nginx's
    /// worker processes, the tokio proxy's runtime).
    #[arg(long, alias = "threads", default_value_t = 1)]
    workers: usize,
    /// Rounds: every candidate runs every workload once per round, rounds interleave the
    /// candidates (each round starting one candidate later), and the report gives each median.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Another build of this benchmark (its `e2e` binary): its svcproxy runs beside this one
    /// as the candidates `base-epoll`, `base-uring`, `base-uring-splice`, `base-uring-sqpoll`.
    #[arg(long)]
    baseline: Option<std::path::PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Subcommand)]
enum Serve {
    /// Run svcproxy as a candidate (used by the harness itself).
    ServeSvcproxy {
        #[arg(long)]
        backend: String,
        #[arg(long)]
        workers: usize,
        #[arg(long)]
        listen: IpAddr,
        #[arg(long = "endpoint")]
        endpoints: Vec<IpAddr>,
        /// Also balance this cgroup's clients at the socket.
        #[arg(long)]
        socket_lb: Option<std::path::PathBuf>,
    },
    /// Run the tokio proxy as a candidate (used by the harness itself).
    ServeTokio {
        #[arg(long)]
        workers: usize,
        #[arg(long)]
        listen: IpAddr,
        #[arg(long = "endpoint")]
        endpoints: Vec<IpAddr>,
    },
}

const WORKLOADS: [&str; 10] = [
    "bulk1",
    "bulk8",
    "rr",
    "cps",
    "wrk-rr",
    "wrk-cps",
    "idle",
    "udp64",
    "udp1400",
    "udp64-flood",
];

/// One measured value, higher is better unless `lower_better`.
#[derive(Debug, Clone)]
struct Cell {
    value: f64,
    text: String,
    /// Operations per second, and what one is called: the candidate's CPU time and context
    /// switches per second of the workload's run, divided by it, are given per operation.
    rate: Option<(f64, &'static str)>,
}

fn main() -> io::Result<()> {
    let cli = Cli::parse();
    match cli.serve {
        Some(Serve::ServeSvcproxy {
            backend,
            workers,
            listen,
            endpoints,
            socket_lb,
        }) => {
            return serve::svcproxy(&backend, workers, listen, &endpoints, socket_lb.as_deref());
        }
        Some(Serve::ServeTokio {
            workers,
            listen,
            endpoints,
        }) => {
            return serve::tokio_proxy(workers, listen, &endpoints);
        }
        None => {}
    }
    serve::raise_nofile();
    let root = rustix::process::geteuid().is_root();
    let topo = if root && !cli.loopback {
        Topology::namespaces()?
    } else {
        Topology::loopback()
    };
    let workers = cli.workers;
    let duration = Duration::from_secs_f64(if cli.quick { 0.5 } else { cli.duration });
    // The descriptor limit caps the count (10,000 when it allows): svcproxy budgets six
    // descriptors per connection (two sockets, and pipes while streaming) in three quarters of
    // seven eighths of its limit, so a tenth of the limit fits; an idle connection also costs
    // two descriptors in this process (client and backend side).
    let idle_count = if cli.quick {
        500
    } else {
        (serve::nofile() / 10).min(10_000) as usize
    };
    let workloads: Vec<String> = cli
        .workloads
        .unwrap_or_else(|| WORKLOADS.iter().map(|s| s.to_string()).collect());
    let mut kinds = vec![Kind::Direct, Kind::Svcproxy("epoll")];
    let uring = svcproxy::io_uring_available();
    match &uring {
        Ok(()) => {
            for mode in ["uring", "uring-splice", "uring-sqpoll"] {
                kinds.push(Kind::Svcproxy(mode));
            }
        }
        Err(why) => eprintln!("io_uring candidates skipped: {why}"),
    }
    if let Some(base) = cli.baseline {
        let _ = candidates::BASELINE.set(base);
        kinds.push(Kind::Baseline("base-epoll"));
        if uring.is_ok() {
            for mode in ["base-uring", "base-uring-splice", "base-uring-sqpoll"] {
                kinds.push(Kind::Baseline(mode));
            }
        }
    }
    kinds.push(Kind::Tokio);
    if which("haproxy") {
        kinds.push(Kind::Haproxy);
    }
    if which("nginx")
        && std::path::Path::new("/usr/lib/nginx/modules/ngx_stream_module.so").exists()
    {
        kinds.push(Kind::Nginx);
    }
    if topo.vip.is_some() && which("nft") {
        kinds.push(Kind::Dnat);
        // svcproxy with transparent listeners, steered by tproxy rules (as svcproxyd as root).
        kinds.push(Kind::Svcproxy("epoll-tproxy"));
        if uring.is_ok() {
            kinds.push(Kind::Svcproxy("uring-tproxy"));
        }
        // Socket-level load balancing (cgroup BPF): the clients connect straight to a backend.
        kinds.push(Kind::Svcproxy("socket-lb"));
    }
    if let Some(only) = &cli.candidates {
        kinds.retain(|k| only.iter().any(|o| short(*k) == o));
    }
    let backends = backends::Backends::start(topo.backend_ns(), &topo.backend_ips)?;
    let scratch = candidates::Scratch::new()?;
    let web = web::WebServer::start(&topo, &scratch.0).unwrap_or_else(|e| {
        eprintln!("wrk workloads skipped: nginx did not serve: {e}");
        None
    });

    let mut samples: Vec<Vec<Vec<Cell>>> = vec![vec![Vec::new(); workloads.len()]; kinds.len()];
    for round in 0..cli.repeat.max(1) {
        // Each round starts one candidate later: a fixed order would give every candidate the
        // same neighbours and the same place in the machine's drift, round after round.
        let order = (0..kinds.len()).map(|i| (i + round) % kinds.len());
        for (k, kind) in order.map(|k| (k, kinds[k])) {
            eprintln!("== {} (round {})", kind.name(), round + 1);
            let running = match candidates::start(kind, &topo, workers, idle_count, &scratch.0) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("   cannot start: {e}");
                    continue;
                }
            };
            let pids = running.pids();
            for (i, w) in workloads.iter().enumerate() {
                let (before, started) = (Usage::of(&pids), std::time::Instant::now());
                let servers = Servers {
                    backends: &backends,
                    web: web.is_some(),
                };
                match measure(w, kind, &running, &topo, servers, duration, idle_count) {
                    Ok(Some(mut c)) => {
                        if let Some((rate, unit)) = c.rate.filter(|_| !pids.is_empty()) {
                            let used = Usage::of(&pids).since(before);
                            let per = used.per(rate * started.elapsed().as_secs_f64(), unit);
                            c.text = format!("{}; {per}", c.text);
                        }
                        eprintln!("   {w}: {}", c.text);
                        samples[k][i].push(c);
                    }
                    Ok(None) => eprintln!("   {w}: n/a"),
                    Err(e) => eprintln!("   {w}: failed: {e}"),
                }
            }
        }
    }
    let results: Vec<(Kind, Vec<Option<Cell>>)> = kinds
        .iter()
        .zip(samples)
        .map(|(kind, per_workload)| (*kind, per_workload.into_iter().map(median).collect()))
        .collect();
    let report = report(
        &topo,
        workers,
        duration,
        cli.repeat.max(1),
        idle_count,
        &workloads,
        &results,
    );
    println!("{report}");
    if let Some(out) = cli.out {
        std::fs::write(out, &report)?;
    }
    Ok(())
}

/// The sample with the median value (the lower middle one of an even count).
fn median(mut cells: Vec<Cell>) -> Option<Cell> {
    cells.sort_by(|a, b| a.value.total_cmp(&b.value));
    let n = cells.len();
    (n > 0).then(|| cells.swap_remove((n - 1) / 2))
}

fn short(kind: Kind) -> &'static str {
    match kind {
        Kind::Direct => "direct",
        Kind::Svcproxy(b) | Kind::Baseline(b) => b,
        Kind::Tokio => "tokio",
        Kind::Haproxy => "haproxy",
        Kind::Nginx => "nginx",
        Kind::Dnat => "dnat",
    }
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// What the candidates forward to.
#[derive(Clone, Copy)]
struct Servers<'a> {
    backends: &'a backends::Backends,
    /// nginx serves HTTP ([`web::WebServer`]).
    web: bool,
}

fn measure(
    workload: &str,
    kind: Kind,
    running: &Running,
    topo: &Topology,
    servers: Servers<'_>,
    duration: Duration,
    idle_count: usize,
) -> io::Result<Option<Cell>> {
    let ns = topo.client_ns();
    let target = running.target.clone();
    let cell = |value: f64, text: String, rate: Option<(f64, &'static str)>| {
        Ok(Some(Cell { value, text, rate }))
    };
    match workload {
        "bulk1" | "bulk8" => {
            let streams = if workload == "bulk1" { 1 } else { 8 };
            let sunk = servers.backends.sunk.clone();
            let gbps = load::on_client(ns, move || {
                Box::pin(load::bulk(target, streams, duration, sunk))
            })??;
            cell(
                gbps,
                format!("{gbps:.2} Gbit/s"),
                Some((gbps * 1e9 / 8.0 / 1e6, "MB")),
            )
        }
        "rr" => {
            let r = load::on_client(ns, move || {
                Box::pin(load::request_response(target, 50, duration))
            })??;
            cell(
                r.rps,
                format!(
                    "{:.0} req/s, p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs",
                    r.rps,
                    us(r.p50),
                    us(r.p99),
                    us(r.p999)
                ),
                Some((r.rps, "req")),
            )
        }
        "cps" => {
            let (cps, failed) = load::on_client(ns, move || {
                Box::pin(load::connection_rate(target, 16, duration))
            })??;
            let fails = if failed > 0 {
                format!(" ({failed} failed)")
            } else {
                String::new()
            };
            cell(cps, format!("{cps:.0} conn/s{fails}"), Some((cps, "conn")))
        }
        "wrk-rr" | "wrk-cps" => {
            if !servers.web {
                return Ok(None);
            }
            let close = workload == "wrk-cps";
            let connections = if close { 16 } else { 50 };
            let Some(r) = web::wrk(topo, target.http[0], connections, close, duration)? else {
                return Ok(None);
            };
            let errors = if r.errors > 0 {
                format!(" ({} errors)", r.errors)
            } else {
                String::new()
            };
            cell(
                r.rps,
                format!(
                    "{:.0} req/s, p50 {:.0} µs, p99 {:.0} µs{errors}",
                    r.rps,
                    us(r.p50),
                    us(r.p99)
                ),
                Some((r.rps, "req")),
            )
        }
        "idle" => {
            if !kind.process() {
                return Ok(None);
            }
            let pids = running.pids();
            let before = usage::rss(&pids);
            let after = load::on_client(ns, move || {
                Box::pin(load::idle(target, idle_count, move || usage::rss(&pids)))
            })??;
            let per = after.saturating_sub(before) as f64 / idle_count as f64;
            // Lower is better: store the inverse so that ratios read "times better".
            cell(
                1.0 / per.max(1.0),
                format!("{per:.0} bytes/conn ({idle_count} idle connections)"),
                None,
            )
        }
        "udp64" | "udp1400" | "udp64-flood" => {
            if !kind.udp() {
                return Ok(None);
            }
            let r = match workload {
                "udp64-flood" => load::on_client(ns, move || {
                    Box::pin(async move { load::udp_flood(&target, 8, 64, duration) })
                })??,
                _ => {
                    let size = if workload == "udp64" { 64 } else { 1400 };
                    load::on_client(ns, move || Box::pin(load::udp(target, 64, size, duration)))??
                }
            };
            cell(
                r.delivered,
                format!("{:.0} dgram/s, {:.2}% lost", r.delivered, r.loss * 100.0),
                Some((r.delivered, "dgram")),
            )
        }
        other => Err(io::Error::other(format!("unknown workload {other:?}"))),
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

fn report(
    topo: &Topology,
    workers: usize,
    duration: Duration,
    repeat: usize,
    idle_count: usize,
    workloads: &[String],
    results: &[(Kind, Vec<Option<Cell>>)],
) -> String {
    let mut out = String::new();
    out.push_str(&format!("Machine: {}\n", machine()));
    out.push_str(&format!(
        "Topology: {}; {workers} worker threads per proxy; {:.1} s per workload; {idle_count} idle connections; median of {repeat} interleaved round(s)\n\n",
        match topo.mode {
            topo::Mode::Loopback => "loopback (client, proxies, backends on 127.0.0.0/8)".to_string(),
            topo::Mode::Namespaces => "namespaces (client + proxy | veth | backends, 198.18.0.0/15)".to_string(),
        },
        duration.as_secs_f64()
    ));
    let find = |k: Kind, i: usize| {
        results
            .iter()
            .find(|(kind, _)| *kind == k)
            .and_then(|(_, row)| row[i].clone())
    };
    for (i, w) in workloads.iter().enumerate() {
        out.push_str(&format!(
            "### {w}\n\n| candidate | result | × HAProxy | × kernel DNAT |\n|---|---|---|---|\n"
        ));
        let haproxy = find(Kind::Haproxy, i);
        let dnat = find(Kind::Dnat, i);
        for (kind, row) in results {
            let ratio = |base: &Option<Cell>| match (&row[i], base) {
                (Some(c), Some(b)) if b.value > 0.0 => format!("{:.2}", c.value / b.value),
                _ => "n/a".into(),
            };
            let text = row[i]
                .as_ref()
                .map_or("n/a".to_string(), |c| c.text.clone());
            out.push_str(&format!(
                "| {} | {text} | {} | {} |\n",
                kind.name(),
                ratio(&haproxy),
                ratio(&dnat)
            ));
        }
        out.push('\n');
    }
    out
}
