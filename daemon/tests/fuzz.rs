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

/// A flow node: scalars that hold brackets, quotes and apostrophes, in sequences and
/// mappings nested up to 80 deep, spread over lines.
fn flow_node() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        Just("a".to_string()),
        Just("don't".to_string()),
        Just("x:'y".to_string()),
        Just("a'b\"c".to_string()),
        Just("'x]]}'".to_string()),
        Just("'it''s ['".to_string()),
        Just("\"]\\\"[{\"".to_string()),
        Just("\"multi\n  line ]\"".to_string()),
        Just("4294967296".to_string()),
        Just("-1e400".to_string()),
    ];
    scalar.prop_recursive(80, 400, 3, |inner| {
        let separator = prop_oneof![Just(", "), Just(",\n  "), Just(" , ")];
        prop_oneof![
            (
                prop::collection::vec(inner.clone(), 0..3),
                separator.clone()
            )
                .prop_map(|(items, sep)| format!("[{}]", items.join(sep))),
            (prop::collection::vec(inner, 0..3), separator).prop_map(|(items, sep)| {
                let pairs: Vec<String> = items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| format!("k{i}: {v}"))
                    .collect();
                format!("{{{}}}", pairs.join(sep))
            }),
        ]
    })
}

/// A document of flow values, comments and block scalars: deep nesting and huge values.
fn nested_yaml() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        4 => flow_node().prop_map(|n| format!("v: {n}")),
        1 => Just("# [[[[ { ' \"".to_string()),
        1 => Just("s: |\n  [[[[ it's {\n  - 'x\n".to_string()),
    ];
    prop::collection::vec(line, 1..4).prop_map(|lines| {
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                l.replacen("v:", &format!("v{i}:"), 1)
                    .replacen("s:", &format!("s{i}:"), 1)
            })
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// How deeply `v` nests.
fn value_depth(v: &serde_norway::Value) -> usize {
    use serde_norway::Value;
    match v {
        Value::Sequence(s) => 1 + s.iter().map(value_depth).max().unwrap_or(0),
        Value::Mapping(m) => {
            1 + m
                .iter()
                .map(|(k, v)| value_depth(k).max(value_depth(v)))
                .max()
                .unwrap_or(0)
        }
        Value::Tagged(t) => value_depth(&t.value),
        _ => 0,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// The nesting scan never counts less than libyaml parses (so what it accepts parses in
    /// linear time), and deep or huge input gets an answer like any other.
    #[test]
    fn deep_nesting_is_refused_before_parsing_and_never_missed(text in nested_yaml()) {
        use serde::Deserialize;
        fuzz_checks::kubernetes_manifests(text.as_bytes()).map_err(TestCaseError::fail)?;
        let counted = svcproxyd::nesting::scan(&text, usize::MAX).unwrap();
        let value = serde_norway::Value::deserialize(serde_norway::Deserializer::from_str(&text));
        let value = value.map_err(|e| TestCaseError::fail(format!("generated bad YAML: {e}")))?;
        // The document is one block mapping: one level the scan does not count.
        prop_assert!(
            value_depth(&value) <= counted + 1,
            "parsed {} levels, counted {counted}", value_depth(&value)
        );
    }

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
