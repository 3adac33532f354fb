//! The candidate processes this binary runs itself: svcproxy, and the tokio
//! `copy_bidirectional` proxy a Rust user would write first.

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use svcproxy::{
    BackendKind, Batch, Endpoint, Forwarding, Options, Protocol, Proxy, ProxyConfig, Service,
    ServicePort, Table,
};

use crate::backends::{TCP_SERVICES, TRANSPARENT_PORT, UDP_PORT};
use crate::candidates::READY;

/// Raises the soft descriptor limit as far as allowed (as root, the hard one too).
pub fn raise_nofile() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let want = 1 << 20;
    if setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(want),
            maximum: Some(want),
        },
    )
    .is_err()
    {
        let hard = getrlimit(Resource::Nofile).maximum;
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: hard,
                maximum: hard,
            },
        );
    }
}

pub fn nofile() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

fn ready() -> ! {
    println!("{READY}");
    let _ = io::stdout().flush();
    loop {
        std::thread::park();
    }
}

pub fn svcproxy(
    backend: &str,
    workers: usize,
    listen: IpAddr,
    endpoints: &[IpAddr],
    socket_lb: Option<&std::path::Path>,
) -> io::Result<()> {
    raise_nofile();
    // Every connection of the load comes from one client address: no per-client share.
    let mut config = ProxyConfig {
        workers,
        max_connections: 1 << 20,
        max_connections_per_client: 1 << 20,
        ..ProxyConfig::default()
    };
    // `-tproxy`: transparent listeners, with the harness's tproxy rules steering to them.
    let backend = match backend.strip_suffix("-tproxy") {
        Some(backend) => {
            config.transparent_port = Some(TRANSPARENT_PORT);
            backend
        }
        None => backend,
    };
    let backend = match backend {
        "epoll" => BackendKind::Epoll,
        // The proxy serves what the socket leaves to it (here: nothing).
        "uring" | "socket-lb" => BackendKind::IoUring,
        "uring-splice" => {
            config.io_uring.forwarding = Forwarding::Splice;
            BackendKind::IoUring
        }
        "uring-sqpoll" => {
            config.io_uring.sqpoll = true;
            BackendKind::IoUring
        }
        other => {
            return Err(io::Error::other(format!(
                "unknown svcproxy backend {other:?}"
            )));
        }
    };
    let table = Arc::new(Table::default());
    let mut batch = Batch::new();
    let tcp = TCP_SERVICES.map(|(name, port)| (name, Protocol::Tcp, port));
    for (name, protocol, port) in tcp.into_iter().chain([("udp", Protocol::Udp, UDP_PORT)]) {
        let svc = Service::new(name)
            .address(listen)
            .port(ServicePort::new(protocol, port));
        let eps = endpoints
            .iter()
            .map(|ip| Endpoint::new(SocketAddr::new(*ip, port)))
            .collect();
        batch = batch.upsert(svc).replace_endpoints(name, eps);
    }
    table.apply(batch).map_err(io::Error::other)?;
    let proxy = Proxy::start(table, Options { backend, config }).map_err(io::Error::other)?;
    if let Some(cgroup) = socket_lb {
        proxy.attach_socket_lb(cgroup).map_err(io::Error::other)?;
    }
    std::mem::forget(proxy);
    ready()
}

pub fn tokio_proxy(workers: usize, listen: IpAddr, endpoints: &[IpAddr]) -> io::Result<()> {
    raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    let endpoints = endpoints.to_vec();
    rt.block_on(async move {
        for (_, port) in TCP_SERVICES {
            let listener = tokio::net::TcpListener::bind(SocketAddr::new(listen, port)).await?;
            let targets: Vec<SocketAddr> = endpoints
                .iter()
                .map(|ip| SocketAddr::new(*ip, port))
                .collect();
            let next = Arc::new(AtomicUsize::new(0));
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let target = targets[next.fetch_add(1, Ordering::Relaxed) % targets.len()];
                    tokio::spawn(async move {
                        let _ = client.set_nodelay(true);
                        if let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await {
                            let _ = upstream.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        }
                    });
                }
            });
        }
        Ok::<_, io::Error>(())
    })?;
    // The runtime keeps serving on its workers while this thread waits.
    let _rt = rt;
    ready()
}
