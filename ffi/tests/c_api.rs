//! Builds the C programs against the static library with `-Wall -Wextra -Werror` and
//! AddressSanitizer (and UBSan), and runs them: the API test (every function, every error
//! path), threads sharing handles, and the round-robin example.

use std::path::PathBuf;
use std::process::Command;

mod common;

fn build_and_run(source: &str, name: &str) -> String {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lib = common::static_lib_dir().join("libsvcproxy_ffi.a");
    let out = std::env::temp_dir().join(format!("svcproxy-{name}-{}", std::process::id()));
    let cc = Command::new("cc")
        .args([
            "-std=c11",
            "-D_DEFAULT_SOURCE",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-g",
        ])
        .args(["-fsanitize=address,undefined", "-fno-omit-frame-pointer"])
        .arg("-I")
        .arg(crate_dir.join("include"))
        .arg(crate_dir.join(source))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&out)
        .output()
        .expect("a C compiler (cc) is installed");
    assert!(
        cc.status.success(),
        "compiling {source} failed:\n{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let run = Command::new(&out)
        .env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=1")
        // Leaks are judged below, by size, rather than by the exit status.
        .env("LSAN_OPTIONS", "exitcode=0")
        .env("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&out);
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "{name} failed:\n{stdout}\n{stderr}");
    // The Rust runtime keeps a few bytes for the process's lifetime (the main thread's handle);
    // anything that grows with the calls made would be far larger.
    let leaked: u64 = stderr
        .lines()
        .filter_map(|l| l.split("SUMMARY: AddressSanitizer: ").nth(1))
        .filter_map(|l| l.split(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(leaked <= 256, "{name} leaked {leaked} bytes:\n{stderr}");
    stdout
}

#[test]
fn every_function_and_error_path_under_asan() {
    let out = build_and_run("tests/c/api_test.c", "api-test");
    assert!(out.contains("all C API checks passed"), "{out}");
}

#[test]
fn threads_share_one_batch_and_one_proxy() {
    let out = build_and_run("tests/c/threads_test.c", "threads-test");
    assert!(
        out.contains("400 services from 4 threads on one batch"),
        "{out}"
    );
}

#[test]
fn the_c_example_goes_round_robin() {
    let out = build_and_run("examples/c/roundrobin.c", "roundrobin");
    let answers: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split("answered by ").nth(1))
        .collect();
    assert_eq!(answers.len(), 6, "{out}");
    assert!(
        answers.windows(2).all(|w| w[0] != w[1]),
        "alternates: {out}"
    );
    assert!(out.contains("demo/web/"), "{out}");
}

#[test]
fn the_shared_library_has_a_soname_and_exports_only_the_api() {
    common::static_lib_dir();
    let lib = common::target_dir().join("libsvcproxy_ffi.so");
    let dynamic = Command::new("readelf")
        .arg("-d")
        .arg(&lib)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&dynamic.stdout);
    assert!(
        text.contains(concat!(
            "Library soname: [libsvcproxy_ffi.so.0.",
            env!("CARGO_PKG_VERSION_MINOR"),
            "]"
        )),
        "{text}"
    );
    let symbols = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&lib)
        .output()
        .unwrap();
    let exported: Vec<String> = String::from_utf8_lossy(&symbols.stdout)
        .lines()
        .filter(|l| l.contains(" T "))
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect();
    assert!(
        exported.iter().any(|s| s == "svcproxy_proxy_new"),
        "{exported:?}"
    );
    let others: Vec<&String> = exported
        .iter()
        .filter(|s| !s.starts_with("svcproxy_"))
        .collect();
    assert!(others.is_empty(), "exported beside the API: {others:?}");
}
