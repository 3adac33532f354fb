//! What a running proxy's workers share with the thread that controls them: the table, the
//! settings, the connection budget, shutdown, and progress reports.
//!
//! Workers report the table generation they have applied (listeners opened and closed, flows
//! purged); [`Control::wait_applied`] lets the owner wait for that instead of sleeping. Bind
//! failures are recorded per frontend so that the owner can show them. A handover to another
//! process ([`crate::handover`]) is driven from here: the owner moves the phase, the workers
//! follow it and deposit their sockets.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use crate::budget::{Budget, Permit};
use crate::clients::{ClientPermit, SharedClientCounts};
use crate::config::ProxyConfig;
use crate::handover::{HandedFlow, Phase, WorkerSockets};
use crate::model::ServicePortKey;
use crate::supervisor::WorkerHealth;
use crate::table::Table;

/// The generation a stopped worker reports applied: later than any real one.
const STOPPED: u64 = u64::MAX - 1;

/// Shared state of one running proxy.
pub struct Control {
    table: Arc<Table>,
    config: ProxyConfig,
    applied: Box<[AtomicU64]>,
    progress: Mutex<()>,
    progressed: Condvar,
    stopping: AtomicBool,
    deadline: Mutex<Option<Instant>>,
    budget: crate::loom::sync::Arc<Budget>,
    bind_errors: Mutex<BTreeMap<ServicePortKey, String>>,
    health: Mutex<Vec<WorkerHealth>>,
    clients: Arc<SharedClientCounts>,
    /// The newest generation every worker has applied, and when the last of them did.
    synced: Mutex<Option<(u64, SystemTime)>>,
    /// The handover phase ([`Phase`]).
    phase: AtomicU8,
    /// Sockets each worker exported in this handover (`None`: not yet).
    exported: Mutex<Vec<Option<WorkerSockets>>>,
    /// Which workers have retired (nothing accepted or received in flight any more).
    retired: Mutex<Vec<bool>>,
    /// Sockets inherited from a process that handed over, by worker, until taken.
    inherited: Mutex<Vec<WorkerSockets>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("config", &self.config)
            .field("workers", &self.applied.len())
            .field("stopping", &self.stopping())
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

/// Everything one worker thread needs.
#[derive(Debug, Clone)]
pub struct WorkerContext {
    /// Worker number, from 0.
    pub index: usize,
    /// The shared state.
    pub control: Arc<Control>,
}

impl WorkerContext {
    /// The table the worker serves.
    pub fn table(&self) -> &Arc<Table> {
        &self.control.table
    }

    /// The settings.
    pub fn config(&self) -> &ProxyConfig {
        &self.control.config
    }
}

impl Control {
    /// Shared state for `workers` workers.
    pub fn new(table: Arc<Table>, config: ProxyConfig, workers: usize) -> Self {
        Self {
            table,
            config,
            applied: (0..workers).map(|_| AtomicU64::new(u64::MAX)).collect(),
            progress: Mutex::new(()),
            progressed: Condvar::new(),
            stopping: AtomicBool::new(false),
            deadline: Mutex::new(None),
            budget: crate::loom::sync::Arc::new(Budget::new(config.max_connections, workers)),
            bind_errors: Mutex::new(BTreeMap::new()),
            health: Mutex::new(vec![WorkerHealth::default(); workers]),
            clients: Arc::default(),
            synced: Mutex::new(None),
            phase: AtomicU8::new(Phase::Serving.as_u8()),
            exported: Mutex::new((0..workers).map(|_| None).collect()),
            retired: Mutex::new(vec![false; workers]),
            inherited: Mutex::new((0..workers).map(|_| WorkerSockets::default()).collect()),
        }
    }

    /// The table.
    pub fn table(&self) -> &Arc<Table> {
        &self.table
    }

    /// The settings.
    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.applied.len()
    }

    /// A worker reports that it has applied `generation`.
    pub fn report_applied(&self, worker: usize, generation: u64) {
        self.applied[worker].store(generation, Ordering::Release);
        let _guard = self.progress.lock().unwrap_or_else(PoisonError::into_inner);
        let everywhere = self
            .applied
            .iter()
            .map(|a| a.load(Ordering::Acquire))
            .min()
            .filter(|&g| g < STOPPED);
        if let Some(g) = everywhere {
            let mut synced = self.synced.lock().unwrap_or_else(PoisonError::into_inner);
            if synced.is_none_or(|(s, _)| s < g) {
                *synced = Some((g, SystemTime::now()));
            }
        }
        self.progressed.notify_all();
    }

    /// The newest table generation every worker has applied, and when the last of them
    /// applied it; `None` until every worker has applied one.
    pub fn synced(&self) -> Option<(u64, SystemTime)> {
        *self.synced.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A worker reports that it has stopped (it applies nothing more).
    pub fn report_stopped(&self, worker: usize) {
        self.report_applied(worker, STOPPED);
    }

    /// Waits until every worker has stopped; false on timeout.
    pub fn wait_stopped(&self, timeout: Duration) -> bool {
        self.wait_applied(STOPPED, timeout)
    }

    /// Waits until every worker has applied `generation` (or a later one), or stopped.
    /// Returns false on timeout.
    pub fn wait_applied(&self, generation: u64, timeout: Duration) -> bool {
        self.wait_until(timeout, || {
            self.applied.iter().all(|a| {
                let g = a.load(Ordering::Acquire);
                g != u64::MAX && g >= generation
            })
        })
    }

    /// Waits until `done` holds, rechecking at each report of progress; false on timeout.
    fn wait_until(&self, timeout: Duration, done: impl Fn() -> bool) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let mut guard = self.progress.lock().unwrap_or_else(PoisonError::into_inner);
        while !done() {
            let left = deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            });
            if left.is_zero() {
                return false;
            }
            guard = self
                .progressed
                .wait_timeout(guard, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Starts a graceful shutdown: stop accepting; close what is left at `deadline` (`None`:
    /// connections run until they end).
    pub fn begin_shutdown(&self, deadline: Option<Instant>) {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner) = deadline;
        self.stopping.store(true, Ordering::Release);
        let _guard = self.progress.lock().unwrap_or_else(PoisonError::into_inner);
        self.progressed.notify_all();
    }

    /// Waits up to `timeout` for shutdown to begin; returns whether it has.
    pub fn wait_stopping(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, || self.stopping())
    }

    /// The supervisor reports that `worker` failed with `reason`: it is being restarted, or
    /// (`down`) it has been given up on.
    pub fn report_worker(&self, worker: usize, reason: String, down: bool) {
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        let h = &mut health[worker];
        if !down {
            h.restarts += 1;
        }
        h.down = down;
        h.last_failure = Some(reason);
    }

    /// How each worker is doing, by worker number.
    pub fn worker_health(&self) -> Vec<WorkerHealth> {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether shutdown has begun.
    #[inline]
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// When remaining connections are closed, once shutdown has begun (`None`: never).
    pub fn deadline(&self) -> Option<Instant> {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets how to wake worker `i` (once, before the workers start).
    pub fn set_waker(&self, wake: impl Fn(usize) + Send + Sync + 'static) {
        self.budget.set_waker(wake);
    }

    /// One connection's unit of the budget for `worker`. When `max_connections` are open it
    /// returns `None`, and the worker is woken once a connection anywhere ends.
    #[inline]
    pub fn admit(&self, worker: usize) -> Option<Permit> {
        Budget::admit(&self.budget, worker)
    }

    /// One connection's unit of `ip`'s share ([`ProxyConfig::connections_per_client`]), over
    /// all workers; `None` when it holds its share.
    #[inline]
    pub fn admit_client(&self, ip: IpAddr) -> Option<ClientPermit> {
        SharedClientCounts::admit(&self.clients, ip, self.config.connections_per_client())
    }

    /// TCP connections open now, over all workers.
    pub fn connections(&self) -> usize {
        self.budget.taken()
    }

    /// Whether `clients` more TCP connections fit in the budget now (a driver that can take a
    /// whole accept queue at once asks before it does).
    pub fn has_room_for(&self, clients: usize) -> bool {
        self.config
            .max_connections
            .saturating_sub(self.connections())
            >= clients
    }

    /// Records (or with `None`, clears) a failure to bind a frontend.
    pub fn set_bind_error(&self, key: ServicePortKey, error: Option<String>) {
        let mut errors = self
            .bind_errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match error {
            Some(e) => {
                errors.insert(key, e);
            }
            None => {
                errors.remove(&key);
            }
        }
    }

    /// Frontends that could not be bound, with the reason.
    pub fn bind_errors(&self) -> BTreeMap<ServicePortKey, String> {
        self.bind_errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The handover phase the workers follow.
    #[inline]
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// Moves the handover to `phase` (the owner wakes the workers after), forgetting (and
    /// closing) what was deposited and not taken, and the workers' reports of having retired.
    pub fn set_phase(&self, phase: Phase) {
        {
            // Under the deposits' lock: a worker deposits only while the phase is Exporting.
            let mut exported = lock(&self.exported);
            exported.iter_mut().for_each(|e| *e = None);
            lock(&self.retired).iter_mut().for_each(|r| *r = false);
            self.phase.store(phase.as_u8(), Ordering::Release);
        }
        let _guard = self.progress.lock().unwrap_or_else(PoisonError::into_inner);
        self.progressed.notify_all();
    }

    /// Worker `worker` deposits the sockets it exports. Outside [`Phase::Exporting`] (the
    /// handover was abandoned meanwhile) they are dropped.
    pub fn deposit(&self, worker: usize, sockets: WorkerSockets) {
        {
            let mut exported = lock(&self.exported);
            if self.phase() == Phase::Exporting {
                exported[worker] = Some(sockets);
            }
        }
        let _guard = self.progress.lock().unwrap_or_else(PoisonError::into_inner);
        self.progressed.notify_all();
    }

    /// Worker `worker` has retired: no accept or receive of its is in flight any more (in
    /// [`Phase::Retired`] only).
    pub fn report_retired(&self, worker: usize) {
        {
            let _exported = lock(&self.exported);
            if self.phase() == Phase::Retired {
                lock(&self.retired)[worker] = true;
            }
        }
        let _guard = self.progress.lock().unwrap_or_else(PoisonError::into_inner);
        self.progressed.notify_all();
    }

    /// Waits until every worker has retired (or stopped); false on timeout.
    pub fn wait_retired(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, || {
            lock(&self.retired)
                .iter()
                .zip(self.applied.iter())
                .all(|(r, a)| *r || a.load(Ordering::Acquire) == STOPPED)
        })
    }

    /// Waits until every worker has deposited its sockets, then takes them (by worker);
    /// `None` on timeout, or when a worker has stopped without depositing.
    pub fn wait_exported(&self, timeout: Duration) -> Option<Vec<WorkerSockets>> {
        let done = self.wait_until(timeout, || {
            let exported = lock(&self.exported);
            exported
                .iter()
                .zip(self.applied.iter())
                .all(|(e, a)| e.is_some() || a.load(Ordering::Acquire) == STOPPED)
        });
        let mut exported = lock(&self.exported);
        if !done || exported.iter().any(Option::is_none) {
            return None;
        }
        Some(exported.iter_mut().filter_map(Option::take).collect())
    }

    /// Gives the workers the sockets a process handed over, by worker (call before they
    /// start). Sockets for workers beyond this proxy's are dropped.
    pub fn inherit(&self, sockets: Vec<WorkerSockets>) {
        let mut inherited = lock(&self.inherited);
        for (slot, s) in inherited.iter_mut().zip(sockets) {
            *slot = s;
        }
    }

    /// The inherited listening socket of `worker` for `key`, if there is one left.
    pub fn take_inherited_listener(&self, worker: usize, key: &ServicePortKey) -> Option<OwnedFd> {
        let mut inherited = lock(&self.inherited);
        let sockets = inherited.get_mut(worker)?;
        if sockets.is_empty() {
            return None;
        }
        sockets.take_listener(key)
    }

    /// The inherited UDP flows of `worker`.
    pub fn take_inherited_flows(&self, worker: usize) -> Vec<(HandedFlow, OwnedFd)> {
        lock(&self.inherited)
            .get_mut(worker)
            .map(|s| std::mem::take(&mut s.flows))
            .unwrap_or_default()
    }

    /// Drops the inherited sockets no worker took (frontends this table does not serve);
    /// returns how many there were.
    pub fn drop_inherited(&self) -> usize {
        let mut inherited = lock(&self.inherited);
        let left = inherited.iter().map(WorkerSockets::len).sum();
        inherited
            .iter_mut()
            .for_each(|s| *s = WorkerSockets::default());
        left
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_the_permits_out() {
        let config = ProxyConfig {
            max_connections: 1,
            ..ProxyConfig::default()
        };
        let c = Control::new(Arc::new(Table::default()), config, 1);
        let permit = c.admit(0).expect("a unit");
        assert!(c.admit(0).is_none());
        assert_eq!(c.connections(), 1);
        drop(permit);
        assert_eq!(c.connections(), 0);
    }

    #[test]
    fn waiting_for_workers_ends_when_all_applied() {
        let c = Arc::new(Control::new(
            Arc::new(Table::default()),
            ProxyConfig::default(),
            2,
        ));
        assert!(!c.wait_applied(0, Duration::from_millis(10)));
        c.report_applied(0, 3);
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.wait_applied(3, Duration::from_secs(10)));
        c.report_applied(1, 4);
        assert!(t.join().unwrap());
        assert!(!c.wait_applied(5, Duration::from_millis(10)));
        c.report_stopped(0);
        c.report_stopped(1);
        assert!(c.wait_applied(5, Duration::from_millis(10)));
    }
}
