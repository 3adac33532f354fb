//! Bad input, fuzzed: the TOML config, the Kubernetes manifest import, the JSON table schema
//! and the admin API get mutated versions of the seed corpus (`tests/corpus/`) and arbitrary
//! bytes. Every input must give a result or an error with a message, never a panic, and an
//! input that is rejected must leave the running table exactly as it was.
//!
//! This is property-based fuzzing with proptest: coverage-guided fuzzers (cargo-fuzz) need a
//! nightly toolchain, which this project's machines do not have. Cases per target:
//! `SVCPROXY_FUZZ_CASES` (default 256; CI runs the default, campaigns run more).

use std::io::Cursor;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use proptest::prelude::*;
use svcproxy::{BackendKind, Options, Proxy, ProxyConfig, Table};
use svcproxy_core::schema::BatchDoc;
use svcproxyd::daemon::Daemon;
use svcproxyd::{config, http, kube};

fn cases() -> u32 {
    std::env::var("SVCPROXY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn corpus(kind: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(kind)
}

fn seeds(kind: &str) -> Vec<Vec<u8>> {
    let dir = corpus(kind);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    seeds.sort();
    seeds
}

/// Tokens that tend to matter to these formats.
const TOKENS: &[&str] = &[
    "\"",
    "'",
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "=",
    "-",
    "\n",
    "  ",
    "0",
    "65536",
    "-1",
    "null",
    "~",
    "true",
    "198.18.0.300",
    "::",
    "UDP",
    "SCTP",
    "ClientIP",
    "None",
    "Local",
    "maglev",
    "\r\n\r\n",
    "Content-Length: 99999999\r\n",
    "Transfer-Encoding: chunked\r\n",
    "/services/",
    "PUT ",
    "%00",
    "\u{0}",
    "é",
    "kind: List",
    "items:",
    "---\n",
];

#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Duplicate(usize, usize),
    Token(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Set(at, b)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, b)| Mutation::Insert(at, b)),
        (any::<usize>(), 1usize..64).prop_map(|(at, n)| Mutation::Delete(at, n)),
        (any::<usize>(), 1usize..64).prop_map(|(at, n)| Mutation::Duplicate(at, n)),
        (any::<usize>(), any::<usize>()).prop_map(|(at, t)| Mutation::Token(at, t)),
    ]
}

fn mutate(mut data: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = data.len();
        let at = |i: usize| if len == 0 { 0 } else { i % (len + 1) };
        match m {
            Mutation::Set(i, b) if len > 0 => data[i % len] = *b,
            Mutation::Set(..) => {}
            Mutation::Insert(i, bytes) => {
                let i = at(*i);
                data.splice(i..i, bytes.iter().copied());
            }
            Mutation::Delete(i, n) => {
                let i = at(*i).min(len);
                let end = (i + n).min(len);
                data.drain(i..end);
            }
            Mutation::Duplicate(i, n) => {
                let i = at(*i).min(len);
                let end = (i + n).min(len);
                let copy = data[i..end].to_vec();
                data.splice(end..end, copy);
            }
            Mutation::Token(i, t) => {
                let i = at(*i);
                data.splice(i..i, TOKENS[t % TOKENS.len()].bytes());
            }
        }
    }
    data
}

/// Mutated seeds of `kind`, and sometimes arbitrary bytes.
fn inputs(kind: &str) -> impl Strategy<Value = Vec<u8>> {
    let seeds = seeds(kind);
    prop_oneof![
        9 => (0..seeds.len(), prop::collection::vec(mutation(), 0..8))
            .prop_map(move |(s, ms)| mutate(seeds[s].clone(), &ms)),
        1 => prop::collection::vec(any::<u8>(), 0..512),
    ]
}

/// A table with one service in it, to check that rejected input leaves it alone.
fn table() -> Table {
    let table = Table::default();
    let doc: BatchDoc =
        serde_json::from_slice(&std::fs::read(corpus("batch").join("upsert.json")).unwrap())
            .unwrap();
    table.apply(doc.to_batch().unwrap()).unwrap();
    table
}

/// Applies what was read; on rejection, the published snapshot must be the same one.
fn apply_or_keep(
    table: &Table,
    batch: Result<svcproxy::core::Batch, String>,
) -> Result<(), TestCaseError> {
    let before = table.load_full();
    match batch.and_then(|b| table.apply(b).map_err(|e| e.to_string())) {
        Ok(_) => Ok(()),
        Err(message) => {
            prop_assert!(!message.is_empty());
            let after = table.load();
            prop_assert!(
                std::ptr::eq(&*before, &**after),
                "a rejected input changed the table"
            );
            Ok(())
        }
    }
}

fn to_batch(doc: BatchDoc) -> Result<svcproxy::core::Batch, String> {
    doc.to_batch()
        .map_err(|(s, e)| format!("service {s:?}: {e}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn toml_config(input in inputs("config")) {
        let dir = std::env::temp_dir().join(format!("svcproxyd-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fuzz.toml");
        std::fs::write(&path, &input).unwrap();
        let loaded = config::load(&path);
        std::fs::remove_dir_all(&dir).unwrap();
        let table = table();
        match loaded {
            Ok(loaded) => apply_or_keep(&table, to_batch(BatchDoc { upsert: loaded.services, remove: vec![] }))?,
            Err(e) => prop_assert!(e.to_string().contains("fuzz.toml"), "{}", e),
        }
    }

    #[test]
    fn kubernetes_manifests(input in inputs("manifest")) {
        let text = String::from_utf8_lossy(&input).into_owned();
        let table = table();
        match kube::services(&[("fuzz.yaml".into(), text)]) {
            Ok(services) => apply_or_keep(&table, to_batch(BatchDoc { upsert: services, remove: vec![] }))?,
            Err(e) => prop_assert!(!e.problem.is_empty() && !e.object.is_empty()),
        }
    }

    #[test]
    fn json_batches(input in inputs("batch")) {
        let table = table();
        match serde_json::from_slice::<BatchDoc>(&input) {
            Ok(doc) => apply_or_keep(&table, to_batch(doc))?,
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn admin_api(input in inputs("admin")) {
        let daemon = daemon();
        let before = daemon.table.load_full();
        let peer = "127.0.0.1:1".parse().unwrap();
        let response = match http::read_request(&mut Cursor::new(&input), peer) {
            Ok(request) => daemon.handle(&request),
            Err(response) => response,
        };
        prop_assert!([200, 400, 401, 404, 405, 409, 413, 431].contains(&response.status), "{}", response.status);
        if response.status != 200 {
            let after = daemon.table.load();
            prop_assert!(std::ptr::eq(&*before, &**after), "a rejected request changed the table");
        }
    }
}

/// One daemon (with a running proxy) for the admin API cases.
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
        let proxy = Proxy::start(table.clone(), options).unwrap();
        Daemon::new(table, proxy, None, None)
    })
}
