//! Bad input, fuzzed with proptest: the TOML config, the Kubernetes manifest import, the JSON
//! table schema and the admin API get mutated versions of the seed corpus (`tests/corpus/`)
//! and arbitrary bytes, and each input must pass the checks in [`fuzz_checks`]: a result or an
//! error with a message, never a panic, and a rejected input leaves the running table exactly as
//! it was.
//!
//! This runs on stable in every `cargo test`; the coverage-guided cargo-fuzz targets in `fuzz/`
//! (nightly) run the same checks. Cases per target: `SVCPROXY_FUZZ_CASES` (default 256; CI runs
//! the default, campaigns run more).

mod fuzz_checks;

use std::path::Path;

use proptest::prelude::*;

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

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn toml_config(input in inputs("config")) {
        fuzz_checks::toml_config(&input).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn kubernetes_manifests(input in inputs("manifest")) {
        fuzz_checks::kubernetes_manifests(&input).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn json_batches(input in inputs("batch")) {
        fuzz_checks::json_batches(&input).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn admin_api(input in inputs("admin")) {
        fuzz_checks::admin_api(&input).map_err(TestCaseError::fail)?;
    }
}
