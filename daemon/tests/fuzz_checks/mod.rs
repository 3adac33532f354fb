//! The checks every fuzzed input must pass, shared by the proptest campaign
//! (`daemon/tests/fuzz.rs`) and the cargo-fuzz targets (`fuzz/`), which include this file.
//!
//! Each check feeds one input to one reader the way the daemon does and returns `Err` with a
//! description when the contract breaks: an input gives a result or an error with a message
//! (a panic is a failure by itself), and an input that is rejected leaves the running table
//! exactly as it was (the same published snapshot, compared by pointer).

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use svcproxy::{BackendKind, Options, Proxy, ProxyConfig, Table};
use svcproxy_core::schema::BatchDoc;
use svcproxyd::daemon::Daemon;
use svcproxyd::{config, http, objects};

/// The batch every check's table starts from: one service.
const UPSERT: &[u8] = include_bytes!("../corpus/batch/upsert.json");

/// Statuses the admin API may answer a request with.
const ADMIN_STATUSES: [u16; 8] = [200, 400, 401, 404, 405, 409, 413, 431];

fn ensure(condition: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if condition { Ok(()) } else { Err(why()) }
}

/// A table with one service in it, to check that rejected input leaves it alone.
fn table() -> Table {
    static SEED: OnceLock<svcproxy::core::Batch> = OnceLock::new();
    let seed = SEED.get_or_init(|| {
        let doc: BatchDoc = serde_json::from_slice(UPSERT).expect("the seed batch parses");
        doc.to_batch().expect("the seed batch is valid")
    });
    let table = Table::default();
    table.apply(seed.clone()).expect("the seed batch applies");
    table
}

fn to_batch(doc: BatchDoc) -> Result<svcproxy::core::Batch, String> {
    doc.to_batch()
        .map_err(|(s, e)| format!("service {s:?}: {e}"))
}

/// Applies what was read; on rejection, the published snapshot must be the same one.
fn apply_or_keep(
    table: &Table,
    batch: Result<svcproxy::core::Batch, String>,
) -> Result<(), String> {
    let before = table.load_full();
    match batch.and_then(|b| table.apply(b).map_err(|e| e.to_string())) {
        Ok(_) => Ok(()),
        Err(message) => {
            ensure(!message.is_empty(), || "an error without a message".into())?;
            ensure(std::ptr::eq(&*before, &**table.load()), || {
                format!("a rejected input changed the table ({message})")
            })
        }
    }
}

/// `input` as this process's config file (in a directory of its own, removed afterwards).
pub fn toml_config(input: &[u8]) -> Result<(), String> {
    let dir: PathBuf = std::env::temp_dir().join(format!("svcproxyd-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join("fuzz.toml");
    std::fs::write(&path, input).map_err(|e| format!("{}: {e}", path.display()))?;
    let loaded = config::load(&path);
    let _ = std::fs::remove_dir_all(&dir);
    match loaded {
        Ok(loaded) => apply_or_keep(
            &table(),
            to_batch(BatchDoc {
                upsert: loaded.services,
                remove: vec![],
            }),
        ),
        Err(e) => ensure(e.to_string().contains("fuzz.toml"), || {
            format!("the error does not name the file: {e}")
        }),
    }
}

/// `input` as a Kubernetes manifest file.
pub fn kubernetes_manifests(input: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(input).into_owned();
    let found = objects::services(&[("fuzz.yaml".into(), text)]);
    found
        .errors
        .iter()
        .chain(found.unparsed.values())
        .try_for_each(|e| {
            ensure(
                !e.problem.is_empty() && e.object.starts_with("fuzz.yaml"),
                || format!("an error that names no file or problem: {e:?}"),
            )
        })?;
    apply_or_keep(
        &table(),
        to_batch(BatchDoc {
            upsert: found.services,
            remove: vec![],
        }),
    )
}

/// `input` as a JSON batch (the table schema).
pub fn json_batches(input: &[u8]) -> Result<(), String> {
    match serde_json::from_slice::<BatchDoc>(input) {
        Ok(doc) => apply_or_keep(&table(), to_batch(doc)),
        Err(e) => ensure(!e.to_string().is_empty(), || {
            "a parse error without a message".into()
        }),
    }
}

/// `input` as the bytes of one admin API request, handled by a daemon with a running proxy.
pub fn admin_api(input: &[u8]) -> Result<(), String> {
    let daemon = daemon();
    let before = daemon.table.load_full();
    let peer = "127.0.0.1:1".parse().expect("a socket address");
    let response = match http::read_request(&mut Cursor::new(input), peer) {
        Ok(request) => daemon.admin(&request),
        Err(response) => response,
    };
    ensure(ADMIN_STATUSES.contains(&response.status), || {
        format!("status {}", response.status)
    })?;
    ensure(
        response.status == 200 || std::ptr::eq(&*before, &**daemon.table.load()),
        || format!("a request answered {} changed the table", response.status),
    )
}

/// One daemon (with a running proxy) for all admin API inputs.
fn daemon() -> &'static Daemon {
    static DAEMON: OnceLock<Daemon> = OnceLock::new();
    DAEMON.get_or_init(|| {
        let table = Arc::new(table());
        let options = Options {
            backend: BackendKind::Epoll,
            config: ProxyConfig {
                workers: 1,
                ..ProxyConfig::default()
            },
        };
        let proxy = Proxy::start(table.clone(), options).expect("the proxy starts");
        Daemon::new(table, proxy, None, None, Duration::from_secs(60))
    })
}
