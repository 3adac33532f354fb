//! The running proxy: worker threads of the chosen backend, woken on every table publish, each
//! supervised ([`svcproxy_core::supervisor`]): a worker that panics or fails is restarted with
//! backoff, and one that keeps failing is reported down ([`Proxy::workers`]).
//!
//! A proxy can hand its sockets to another process ([`Proxy::export`], then [`Proxy::retire`]
//! or [`Proxy::resume`]), and start from sockets handed over ([`Proxy::start_inheriting`]):
//! see [`svcproxy_core::handover`].
//!
//! Node-local clients can also be balanced at the socket, before a packet exists
//! ([`Proxy::attach_socket_lb`], see [`svcproxy_socklb`]): those connections never reach the
//! workers, and their counters are added to [`Proxy::stats`].

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use svcproxy_core::handover::{Phase, WorkerSockets};
use svcproxy_core::table::SubscriptionId;
use svcproxy_core::{
    Control, DescriptorBudget, PortStats, ProxyConfig, ServicePortKey, Table, WorkerContext,
    WorkerHealth, supervise,
};
use svcproxy_socklb::SocketLb;
use svcproxy_sys::Waker;
use tracing::info;

/// Which data plane runs the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// io_uring when this kernel and process allow it, else epoll (the log says which and why).
    #[default]
    Auto,
    /// Edge-triggered epoll with splice.
    Epoll,
    /// io_uring (fails to start where io_uring is unavailable).
    IoUring,
}

/// Whether the io_uring backend can run here; `Err` says why not.
pub fn io_uring_available() -> Result<(), String> {
    if std::env::var_os(DISABLE_IO_URING).is_some() {
        return Err(format!(
            "disabled by the environment variable {DISABLE_IO_URING}"
        ));
    }
    svcproxy_uring::probe().map_err(|e| e.to_string())
}

/// Set (to anything) to make [`BackendKind::Auto`] choose epoll, as if io_uring were
/// unavailable (for tests of the fallback, and as an operator's switch).
pub const DISABLE_IO_URING: &str = "SVCPROXY_DISABLE_IO_URING";

/// How to start a [`Proxy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Options {
    /// The backend.
    pub backend: BackendKind,
    /// Workers, timeouts, limits.
    pub config: ProxyConfig,
}

/// Why a proxy could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An option is out of range; nothing was started.
    #[error("invalid option: {0}")]
    Config(String),
    /// A system resource (thread, epoll instance, eventfd) could not be had.
    #[error("cannot start the proxy: {0}")]
    Io(#[from] io::Error),
    /// The workers did not apply a table generation in time.
    #[error("workers did not apply table generation {generation} within {timeout:?}")]
    Timeout {
        /// The generation waited for.
        generation: u64,
        /// How long was waited.
        timeout: Duration,
    },
    /// A handover to another process could not be made; this proxy serves on.
    #[error("handover: {0}")]
    Handover(String),
    /// Socket-level load balancing could not be attached; the proxy serves on without it.
    #[error("socket-level load balancing: {0}")]
    SocketLb(#[from] svcproxy_socklb::Error),
    /// A worker stopped with an error.
    #[error("worker {worker} failed: {error}")]
    Worker {
        /// Worker number.
        worker: usize,
        /// What went wrong.
        error: io::Error,
    },
}

/// A running proxy. Dropping it shuts it down at once; [`Proxy::shutdown`] drains gracefully.
#[derive(Debug)]
pub struct Proxy {
    budget: DescriptorBudget,
    control: Arc<Control>,
    wakers: Arc<Vec<Arc<Waker>>>,
    subscription: SubscriptionId,
    threads: Vec<JoinHandle<io::Result<()>>>,
    backend: BackendKind,
    socket_lb: Mutex<Option<SocketLb>>,
}

/// How long [`Proxy::start`] waits for the workers to open the table's listeners.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Descriptors one TCP connection may hold: its two sockets and, while a direction streams
/// (splice, on either backend and in every mode), a pipe of two per direction.
const DESCRIPTORS_PER_CONNECTION: u64 = 6;

impl Proxy {
    /// Starts the workers on `table` and waits until they listen on its current frontends.
    /// Later changes to `table` apply while the proxy runs.
    pub fn start(table: Arc<Table>, options: Options) -> Result<Proxy, Error> {
        Self::start_inheriting(table, options, Vec::new())
    }

    /// As [`Proxy::start`], with the sockets another process handed over (by worker, as its
    /// [`Proxy::export`] returned them): worker `i` adopts worker `i`'s listeners and UDP
    /// flows where its table serves them. Inherited sockets no worker took are closed once
    /// the workers listen. With an inheritance, the workers neither accept nor receive until
    /// [`Proxy::begin_serving`] (once the other process has retired).
    pub fn start_inheriting(
        table: Arc<Table>,
        options: Options,
        inherited: Vec<WorkerSockets>,
    ) -> Result<Proxy, Error> {
        options.config.validate().map_err(Error::Config)?;
        let backend = match options.backend {
            BackendKind::Auto => match io_uring_available() {
                Ok(()) => BackendKind::IoUring,
                Err(why) => {
                    info!(%why, "io_uring unavailable, using epoll");
                    BackendKind::Epoll
                }
            },
            BackendKind::IoUring => {
                io_uring_available()
                    .map_err(|why| Error::Config(format!("io_uring backend: {why}")))?;
                BackendKind::IoUring
            }
            BackendKind::Epoll => BackendKind::Epoll,
        };
        let workers = options.config.worker_count();
        let budget = DescriptorBudget::new(
            svcproxy_sys::limits::descriptor_limit(),
            workers,
            DESCRIPTORS_PER_CONNECTION,
        );
        let mut config = options.config;
        budget.fit(&mut config);
        info!(
            ?backend,
            workers,
            descriptors = budget.limit,
            max_connections = config.max_connections,
            max_udp_flows_per_worker = config.max_udp_flows,
            "starting svcproxy"
        );
        let control = Arc::new(Control::new(table.clone(), config, workers));
        if !inherited.is_empty() {
            control.set_phase(Phase::Inheriting);
            control.inherit(inherited);
        }
        let wakers: Arc<Vec<Arc<Waker>>> = Arc::new(
            (0..workers)
                .map(|_| Waker::new().map(Arc::new))
                .collect::<io::Result<_>>()?,
        );
        {
            let wakers = wakers.clone();
            control.set_waker(move |i| wakers[i].wake());
        }
        let subscription = {
            let wakers = wakers.clone();
            table.subscribe(move |_| wakers.iter().for_each(|w| w.wake()))
        };
        let mut proxy = Proxy {
            budget,
            control: control.clone(),
            wakers: wakers.clone(),
            subscription,
            threads: Vec::with_capacity(workers),
            backend,
            socket_lb: Mutex::new(None),
        };
        for (index, waker) in wakers.iter().enumerate() {
            let ctx = WorkerContext {
                index,
                control: control.clone(),
            };
            let waker = waker.clone();
            let thread = std::thread::Builder::new()
                .name(format!("svcproxy-{index}"))
                .spawn(move || {
                    supervise(&ctx, || match backend {
                        BackendKind::IoUring => svcproxy_uring::run(ctx.clone(), waker.clone()),
                        _ => svcproxy_epoll::run(ctx.clone(), waker.clone()),
                    })
                });
            match thread {
                Ok(t) => proxy.threads.push(t),
                Err(e) => {
                    for i in index..workers {
                        control.report_stopped(i);
                    }
                    proxy.stop(Some(Instant::now()));
                    return Err(Error::Io(e));
                }
            }
        }
        let generation = table.load().generation();
        let applied = control.wait_applied(generation, START_TIMEOUT);
        if let Some(error) = proxy.down() {
            proxy.stop(Some(Instant::now()));
            return Err(error);
        }
        if !applied {
            proxy.stop(Some(Instant::now()));
            return Err(Error::Timeout {
                generation,
                timeout: START_TIMEOUT,
            });
        }
        let unused = control.drop_inherited();
        if unused > 0 {
            info!(
                sockets = unused,
                "inherited sockets this table does not serve were closed"
            );
        }
        Ok(proxy)
    }

    /// Number of worker threads.
    pub fn worker_count(&self) -> usize {
        self.control.workers()
    }

    /// Begins a handover: every worker stops receiving UDP and exports its sockets (see
    /// [`svcproxy_core::handover`]). Returns them by worker, once all have; TCP keeps being
    /// served meanwhile. Then call [`Proxy::retire`] once the other process serves them, or
    /// [`Proxy::resume`] if it failed. On timeout the handover is abandoned (as by
    /// `resume`).
    pub fn export(&self, timeout: Duration) -> Result<Vec<WorkerSockets>, Error> {
        self.set_phase(Phase::Exporting);
        match self.control.wait_exported(timeout) {
            Some(sockets) => Ok(sockets),
            None => {
                self.resume();
                Err(Error::Handover(format!(
                    "the workers did not export their sockets within {timeout:?}"
                )))
            }
        }
    }

    /// Abandons a handover (exported, or even retired): the proxy serves as before.
    pub fn resume(&self) {
        self.set_phase(Phase::Serving);
    }

    /// Starts serving the inherited sockets (see [`Proxy::start_inheriting`]); a proxy
    /// started without an inheritance serves already.
    pub fn begin_serving(&self) {
        self.set_phase(Phase::Serving);
    }

    /// Ends a handover: another process serves the exported sockets. This proxy accepts and
    /// receives nothing more; its connections go on until they end or
    /// [`Proxy::drain`] / [`Proxy::shutdown`] end them, and its sockets are let go of, never
    /// ended. Waits up to `timeout` for every worker's accepts in flight to end (a client
    /// they take is served here), and says whether they did. [`Proxy::resume`] undoes it.
    pub fn retire(&self, timeout: Duration) -> bool {
        self.set_phase(Phase::Retired);
        self.control.wait_retired(timeout)
    }

    fn set_phase(&self, phase: Phase) {
        self.control.set_phase(phase);
        self.wakers.iter().for_each(|w| w.wake());
    }

    /// The backend running.
    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// The settings in effect: those given, with the connection and flow limits lowered to
    /// what the descriptor budget allows.
    pub fn config(&self) -> &ProxyConfig {
        self.control.config()
    }

    /// How the process's descriptor limit was split when the proxy started.
    pub fn descriptor_budget(&self) -> DescriptorBudget {
        self.budget
    }

    /// The service table.
    pub fn table(&self) -> &Arc<Table> {
        self.control.table()
    }

    /// Waits until every worker has applied the table's current generation (listeners opened
    /// and closed, UDP flows purged). Returns that generation.
    /// A worker that is down fails it.
    pub fn sync(&self, timeout: Duration) -> Result<u64, Error> {
        let generation = self.control.table().load().generation();
        let applied = self.control.wait_applied(generation, timeout);
        if let Some(down) = self.down() {
            return Err(down);
        }
        if applied {
            Ok(generation)
        } else {
            Err(Error::Timeout {
                generation,
                timeout,
            })
        }
    }

    /// Counters of every service port and endpoint (with what socket-level load balancing
    /// counted, when attached).
    pub fn stats(&self) -> Vec<PortStats> {
        let mut stats = self.control.table().load().stats();
        if let Some(lb) = self.socket_lb_guard().as_ref() {
            lb.add_stats(&mut stats);
        }
        stats
    }

    /// Balances the clients in `cgroup` (a cgroup v2 directory; its processes and those below
    /// it, in any network namespace) at the socket from now on, following this proxy's table
    /// (see [`svcproxy_socklb`]). Replaces an earlier attachment. Needs root (CAP_BPF and
    /// CAP_NET_ADMIN); on `Err` the proxy serves as before, every client through the workers.
    pub fn attach_socket_lb(&self, cgroup: &Path) -> Result<(), Error> {
        let lb = SocketLb::attach(cgroup, self.control.table().clone())?;
        let status = lb.status();
        info!(cgroup = %cgroup.display(), frontends = status.frontends, "socket-level load balancing attached");
        // The one it replaces detaches outside the lock (stats go on meanwhile).
        let replaced = self.socket_lb_guard().replace(lb);
        drop(replaced);
        Ok(())
    }

    /// Where socket-level load balancing is attached and what it serves, if it is.
    pub fn socket_lb(&self) -> Option<svcproxy_socklb::Status> {
        self.socket_lb_guard().as_ref().map(SocketLb::status)
    }

    /// Detaches socket-level load balancing: node-local clients reach the workers again.
    pub fn detach_socket_lb(&self) {
        let attached = self.socket_lb_guard().take();
        drop(attached);
    }

    fn socket_lb_guard(&self) -> std::sync::MutexGuard<'_, Option<SocketLb>> {
        self.socket_lb
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// TCP connections open now.
    pub fn connections(&self) -> usize {
        self.control.connections()
    }

    /// How each worker is doing (restarts, last failure, down), by worker number.
    pub fn workers(&self) -> Vec<WorkerHealth> {
        self.control.worker_health()
    }

    /// The first worker that is down (given up on after failing again and again), if any.
    pub fn down(&self) -> Option<Error> {
        let (worker, health) = self
            .workers()
            .into_iter()
            .enumerate()
            .find(|(_, h)| h.down)?;
        let reason = health.last_failure.unwrap_or_default();
        Some(Error::Worker {
            worker,
            error: io::Error::other(reason),
        })
    }

    /// The newest table generation every worker has applied to the data path, and when the
    /// last of them applied it; `None` until every worker has applied one.
    pub fn synced(&self) -> Option<(u64, std::time::SystemTime)> {
        self.control.synced()
    }

    /// Frontends that could not be bound (retried every second), with the reason.
    pub fn bind_errors(&self) -> BTreeMap<ServicePortKey, String> {
        self.control.bind_errors()
    }

    /// Stops accepting and waits up to `grace` for open connections to finish (and the
    /// workers with them); returns whether they all did. The proxy serves nothing new after
    /// this; [`Proxy::shutdown`] then closes what is left.
    pub fn drain(&self, grace: Duration) -> bool {
        self.detach_socket_lb();
        self.control
            .begin_shutdown(Instant::now().checked_add(grace));
        self.wakers.iter().for_each(|w| w.wake());
        self.control.wait_stopped(grace)
    }

    /// Stops accepting, lets open connections finish for up to `grace`, then closes the rest
    /// and stops the workers. `Err` names the first worker that failed (after all stopped).
    pub fn shutdown(mut self, grace: Duration) -> Result<(), Error> {
        self.drain(grace);
        match self.stop(Some(Instant::now())) {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Stops the workers, closing what is open at `deadline` (`None`: whenever it ends);
    /// returns the first worker's error, if one failed or panicked.
    fn stop(&mut self, deadline: Option<Instant>) -> Option<Error> {
        self.detach_socket_lb();
        self.control.table().unsubscribe(self.subscription);
        self.control.begin_shutdown(deadline);
        self.wakers.iter().for_each(|w| w.wake());
        let mut first = None;
        for (worker, thread) in self.threads.drain(..).enumerate() {
            let error = match thread.join() {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(_) => io::Error::other("panicked"),
            };
            first.get_or_insert(Error::Worker { worker, error });
        }
        first
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop(Some(Instant::now()));
        }
    }
}
