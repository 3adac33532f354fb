//! svcproxy's C ABI: run the proxy inside a C or Go program.
//!
//! Conventions (those of rustls-ffi):
//! - Every symbol starts with `svcproxy_`; objects are opaque handles made by `_new` and
//!   released by `_free`.
//! - Fallible functions return a [`svcproxy_result`] (stable numbers) and write the error text
//!   into the caller's buffer `err` of `err_len` bytes in the same call (NUL-terminated,
//!   truncated; NULL to skip). There is no thread-local "last error".
//! - Every pointer is checked for NULL; no panic unwinds into the caller (it becomes
//!   `SVCPROXY_RESULT_PANIC`).
//! - Thread safety: any thread may call any function on a handle at any time, except that
//!   nothing may use a handle during or after its `_free`.
//! - Ownership: strings and arrays passed in are borrowed for the call only; handles returned
//!   are owned by the caller until their `_free`.

#![deny(clippy::undocumented_unsafe_blocks)]
#![allow(non_camel_case_types)]

mod abi;
mod convert;
mod options;
mod stats;

#[cfg(test)]
mod boundary_tests;

use std::ffi::c_char;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use svcproxy::{BackendKind, Options, Proxy, Table, TableError};
use svcproxy_core::schema::{BatchDoc, TableDoc};

pub use abi::svcproxy_result;
use abi::{
    Failure, Outcome, array, guard, into_handle, maybe_write, object, optional_text, slot, text,
};
pub use convert::{svcproxy_endpoint, svcproxy_named_port, svcproxy_port, svcproxy_service};
use options::options_from;
pub use options::{
    SVCPROXY_BACKEND_AUTO, SVCPROXY_BACKEND_EPOLL, SVCPROXY_BACKEND_IO_URING,
    SVCPROXY_FORWARDING_BUFFERS, SVCPROXY_FORWARDING_SPLICE, svcproxy_options,
    svcproxy_options_default,
};
pub use stats::{svcproxy_counters, svcproxy_endpoint_stats, svcproxy_port_stats};

/// A proxy: its service table, and its workers once started.
pub struct svcproxy_proxy {
    table: Arc<Table>,
    options: Options,
    running: Mutex<Option<Proxy>>,
}

/// A batch of table changes, applied together by [`svcproxy_proxy_apply`]. Threads may add
/// to one batch at once (each addition is whole; their order is the order they took the lock).
pub struct svcproxy_batch {
    changes: Mutex<svcproxy::core::Batch>,
}

/// The library version, a static NUL-terminated string (never freed).
#[unsafe(no_mangle)]
pub extern "C" fn svcproxy_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Creates a proxy (not started) with an empty service table. On success `*out` holds a handle
/// the caller frees with [`svcproxy_proxy_free`].
#[unsafe(no_mangle)]
pub extern "C" fn svcproxy_proxy_new(
    options: *const svcproxy_options,
    out: *mut *mut svcproxy_proxy,
    err: *mut c_char,
    err_len: usize,
) -> svcproxy_result {
    guard(err, err_len, || {
        let options = object(options, "options")?;
        let out = slot(out, "out")?;
        let (options, table) = options_from(options)?;
        *out = into_handle(svcproxy_proxy {
            table: Arc::new(Table::new(table)),
            options,
            running: Mutex::new(None),
        });
        Ok(())
    })
}

pub(crate) fn lock(proxy: &svcproxy_proxy) -> std::sync::MutexGuard<'_, Option<Proxy>> {
    proxy
        .running
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Starts the workers; returns once they serve the table's current frontends.
#[unsafe(no_mangle)]
pub extern "C" fn svcproxy_proxy_start(
    proxy: *const svcproxy_proxy,
    err: *mut c_char,
    err_len: usize,
) -> svcproxy_result {
    guard(err, err_len, || {
        let p = object(proxy, "proxy")?;
        let mut running = lock(p);
        if running.is_some() {
            return Err(Failure::new(
                svcproxy_result::State,
                "the proxy is already running",
            ));
        }
        let started = Proxy::start(p.table.clone(), p.options).map_err(|e| match e {
            svcproxy::Error::Config(m) => Failure::new(svcproxy_result::Start, m),
            other => Failure::new(svcproxy_result::Start, other.to_string()),
        })?;
        *running = Some(started);
        Ok(())
    })
}

/// The backend running (`SVCPROXY_BACKEND_EPOLL` or `_IO_URING`), or `SVCPROXY_BACKEND_AUTO`
/// when the proxy is not running or `proxy` is NULL.
#[unsafe(no_mangle)]
pub extern "C" fn svcproxy_proxy_backend(proxy: *const svcproxy_proxy) -> u32 {
    let mut backend = SVCPROXY_BACKEND_AUTO;
    guard(std::ptr::null_mut(), 0, || {
        let p = object(proxy, "proxy")?;
        backend = match lock(p).as_ref().map(Proxy::backend) {
            Some(BackendKind::Epoll) => SVCPROXY_BACKEND_EPOLL,
            Some(BackendKind::IoUring) => SVCPROXY_BACKEND_IO_URING,
            _ => SVCPROXY_BACKEND_AUTO,
        };
        Ok(())
    });
    backend
}

/// Stops accepting, lets open connections finish for up to `grace_ms`, then stops the
/// workers. The proxy may be started again.
#[unsafe(no_mangle)]
pub extern "C" fn svcproxy_proxy_shutdown(
    proxy: *const svcproxy_proxy,
    grace_ms: u32,
    err: *mut c_char,
    err_len: usize,
) -> svcproxy_result {
    guard(err, err_len, || {
        let p = object(proxy, "proxy")?;
        let running = lock(p).take();
        let Some(running) = running else {
            return Err(Failure::new(
                svcproxy_result::State,
                "the proxy is not running",
            ));
        };
        running
            .shutdown(Duration::from_millis(u64::from(grace_ms)))
            .map_err(|e| Failure::new(svcproxy_result::State, e.to_string()))
    })
}

/// Waits up to `timeout_ms` until every worker has applied the table's current generation;
/// writes it to `generation` (may be NULL).
#[unsafe(no_mangle)]
pub extern "C" fn svcproxy_proxy_sync(
    proxy: *const svcproxy_proxy,
    timeout_ms: u32,
    generation: *mut u64,
    err: *mut c_char,
    err_len: usize,
) -> svcproxy_result {
    guard(err, err_len, || {
        let g = with_running(proxy, |p| {
            p.sync(Duration::from_millis(u64::from(timeout_ms)))
                .map_err(|e| Failure::new(svcproxy_result::Timeout, e.to_string()))
        })?;
        maybe_write(generation, g);
        Ok(())
    })
}

/// `f` of the running proxy behind handle `proxy`; a `State` failure when it is not running.
fn with_running<T>(
    proxy: *const svcproxy_proxy,
    f: impl FnOnce(&Proxy) -> Result<T, Failure>,
) -> Result<T, Failure> {
    let p = object(proxy, "proxy")?;
    match lock(p).as_ref() {
        Some(running) => f(running),
        None => Err(Failure::new(
            svcproxy_result::State,
            "the proxy is not running",
        )),
    }
}

/// Balances the clients in cgroup v2 directory `cgroup` (NULL: the cgroup v2 root, every
/// process) at the socket: cgroup BPF programs connect them straight to an endpoint, following
/// the proxy's table, until [`svcproxy_proxy_detach_socket_lb`] or shutdown. The proxy must be
/// running. Needs root (CAP_BPF and CAP_NET_ADMIN); on failure (`SVCPROXY_RESULT_START`, with
/// the reason) the proxy serves every client as before.
#[unsafe(no_mangle)]
pub extern "C" fn svcproxy_proxy_attach_socket_lb(
    proxy: *const svcproxy_proxy,
    cgroup: *const c_char,
    err: *mut c_char,
    err_len: usize,
) -> svcproxy_result {
    guard(err, err_len, || {
        let start = |m: String| Failure::new(svcproxy_result::Start, m);
        let cgroup = match optional_text(cgroup, "cgroup")? {
            Some(c) => std::path::PathBuf::from(c),
            None => svcproxy::socket_lb::cgroup2_mount().map_err(|e| start(e.to_string()))?,
        };
        with_running(proxy, |p| {
            p.attach_socket_lb(&cgroup)
                .map_err(|e| start(e.to_string()))
        })
    })
}

/// Detaches socket-level load balancing (nothing when it is not attached): every client goes
/// through the proxy again.
#[unsafe(no_mangle)]
pub extern "C" fn svcproxy_proxy_detach_socket_lb(
    proxy: *const svcproxy_proxy,
    err: *mut c_char,
    err_len: usize,
) -> svcproxy_result {
    guard(err, err_len, || {
        with_running(proxy, |p| {
            p.detach_socket_lb();
            Ok(())
        })
    })
}

/// Frees a proxy made by [`svcproxy_proxy_new`], stopping it at once if it runs. NULL is
/// ignored. The handle must not be used again, nor freed twice.
#[unsafe(no_mangle)]
pub extern "C" fn svcproxy_proxy_free(proxy: *mut svcproxy_proxy) {
    guard(std::ptr::null_mut(), 0, || {
        drop(abi::from_handle(proxy));
        Ok(())
    });
}

/// Creates an empty batch; `*out` is freed with [`svcproxy_batch_free`].
#[unsafe(no_mangle)]
pub extern "C" fn svcproxy_batch_new(out: *mut *mut svcproxy_batch) -> svcproxy_result {
    guard(std::ptr::null_mut(), 0, || {
        *slot(out, "out")? = into_handle(svcproxy_batch {
            changes: Mutex::new(svcproxy::core::Batch::new()),
        });
        Ok(())
    })
}

/// Frees a batch made by [`svcproxy_batch_new`]. NULL is ignored. The handle must not be used
/// again, nor freed twice.
#[unsafe(no_mangle)]
pub extern "C" fn svcproxy_batch_free(batch: *mut svcproxy_batch) {
    guard(std::ptr::null_mut(), 0, || {
        drop(abi::from_handle(batch));
        Ok(())
    });
}

/// The changes of handle `batch`, locked: handles are shared between threads, so never
/// borrowed mutably.
fn changes<'a>(
    batch: *const svcproxy_batch,
) -> Result<std::sync::MutexGuard<'a, svcproxy::core::Batch>, Failure> {
    Ok(object(batch, "batch")?
        .changes
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner))
}

/// Adds "add or replace this service" to the batch (its endpoints stay unless replaced).
#[unsafe(no_mangle)]
pub extern "C" fn svcproxy_batch_upsert_service(
    batch: *mut svcproxy_batch,
    service: *const svcproxy_service,
    err: *mut c_char,
    err_len: usize,
) -> svcproxy_result {
    guard(err, err_len, || {
        let service = convert::service(object(service, "service")?)?;
        changes(batch)?.push(svcproxy::Change::Upsert(service));
        Ok(())
    })
}

/// Adds "replace every endpoint of `service` with these `len`" to the batch.
#[unsafe(no_mangle)]
pub extern "C" fn svcproxy_batch_replace_endpoints(
    batch: *mut svcproxy_batch,
    service: *const c_char,
    endpoints: *const svcproxy_endpoint,
    len: usize,
    err: *mut c_char,
    err_len: usize,
) -> svcproxy_result {
    guard(err, err_len, || {
        let service = text(service, "service")?.to_string();
        let endpoints = array(endpoints, len, "endpoints")?
            .iter()
            .enumerate()
            .map(|(i, e)| convert::endpoint(e, i))
            .collect::<Result<_, _>>()?;
        changes(batch)?.push(svcproxy::Change::ReplaceEndpoints { service, endpoints });
        Ok(())
    })
}

/// Adds "remove `service`" to the batch.
#[unsafe(no_mangle)]
pub extern "C" fn svcproxy_batch_remove_service(
    batch: *mut svcproxy_batch,
    service: *const c_char,
    err: *mut c_char,
    err_len: usize,
) -> svcproxy_result {
    guard(err, err_len, || {
        let name = text(service, "service")?.to_string();
        changes(batch)?.push(svcproxy::Change::Remove(name));
        Ok(())
    })
}

fn table_failure(e: TableError) -> Failure {
    let code = match e {
        TableError::UnknownService(_) => svcproxy_result::UnknownService,
        TableError::Conflict { .. } => svcproxy_result::Conflict,
        _ => svcproxy_result::Invalid,
    };
    Failure::new(code, e.to_string())
}

fn publish(p: &svcproxy_proxy, batch: svcproxy::core::Batch, generation: *mut u64) -> Outcome {
    let published = p.table.apply(batch).map_err(table_failure)?;
    maybe_write(generation, published.generation);
    Ok(())
}

/// Applies every change of `batch` as one table generation, or none of them; writes the new
/// generation to `generation` (may be NULL). The batch is not consumed.
#[unsafe(no_mangle)]
pub extern "C" fn svcproxy_proxy_apply(
    proxy: *const svcproxy_proxy,
    batch: *const svcproxy_batch,
    generation: *mut u64,
    err: *mut c_char,
    err_len: usize,
) -> svcproxy_result {
    guard(err, err_len, || {
        let p = object(proxy, "proxy")?;
        let batch = changes(batch)?.clone();
        publish(p, batch, generation)
    })
}

/// Applies a JSON batch document (`{"upsert": [...], "remove": [...]}`, the daemon's schema)
/// as one table generation, or nothing of it.
#[unsafe(no_mangle)]
pub extern "C" fn svcproxy_proxy_apply_json(
    proxy: *const svcproxy_proxy,
    json: *const c_char,
    generation: *mut u64,
    err: *mut c_char,
    err_len: usize,
) -> svcproxy_result {
    guard(err, err_len, || {
        let p = object(proxy, "proxy")?;
        let json = text(json, "json")?;
        let doc: BatchDoc = serde_json::from_str(json)
            .map_err(|e| Failure::new(svcproxy_result::Json, format!("batch JSON: {e}")))?;
        let batch = doc.to_batch().map_err(|(service, e)| {
            Failure::new(
                svcproxy_result::Invalid,
                format!("service {service:?}: {e}"),
            )
        })?;
        publish(p, batch, generation)
    })
}

/// Writes the whole table as a JSON document (`{"services": [...]}`) into `buf` of
/// `capacity` bytes, NUL-terminated; `needed` (may be NULL) gets the size required including
/// the NUL. Returns `SVCPROXY_RESULT_BUFFER` when `capacity` is too small.
#[unsafe(no_mangle)]
pub extern "C" fn svcproxy_proxy_table_json(
    proxy: *const svcproxy_proxy,
    buf: *mut c_char,
    capacity: usize,
    needed: *mut usize,
    err: *mut c_char,
    err_len: usize,
) -> svcproxy_result {
    guard(err, err_len, || {
        let p = object(proxy, "proxy")?;
        let doc = TableDoc::from_snapshot(&p.table.load());
        let json = serde_json::to_string(&doc)
            .map_err(|e| Failure::new(svcproxy_result::Panic, e.to_string()))?;
        stats::write_string(&json, buf, capacity, needed)
    })
}
