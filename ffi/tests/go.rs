//! Runs the Go package's tests and its example, linked against the static library with the
//! documented link line. Without a Go toolchain the tests are skipped (and say so), except
//! under CI (`CI` set), where they must run.

use std::path::PathBuf;
use std::process::Command;

mod common;

/// `go`, or `None` (skipping) when it is not installed and this is not CI.
fn go() -> Option<Command> {
    let found = Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "Go is required under CI (install golang-go)"
        );
        eprintln!("skipped: no Go toolchain (install golang-go to run the Go tests)");
        return None;
    }
    let mut cmd = Command::new("go");
    cmd.current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("go"))
        .env("CGO_ENABLED", "1")
        .env(
            "CGO_LDFLAGS",
            format!("-L{}", common::static_lib_dir().display()),
        )
        .env("GOFLAGS", "-count=1");
    Some(cmd)
}

#[test]
fn go_package_tests_pass() {
    let Some(mut go) = go() else { return };
    let out = go.args(["test", "-v", "./..."]).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "go test failed:\n{text}");
    for test in [
        "TestStartTrafficStatsAndShutdown",
        "TestTableChangesWhileRunning",
        "TestErrors",
        "TestSocketLBConnectsStraightToTheEndpoint",
        "TestDurationsRoundUpToMillisecondsAndLongWaitsAreClamped",
    ] {
        assert!(
            text.contains(&format!("--- PASS: {test}")),
            "{test} did not pass:\n{text}"
        );
    }
}

#[test]
fn go_example_goes_round_robin() {
    let Some(mut go) = go() else { return };
    let out = go.args(["run", "./examples/roundrobin"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split("answered by ").nth(1))
        .collect();
    assert_eq!(answers.len(), 6, "{text}");
    assert!(answers.windows(2).all(|w| w[0] != w[1]), "{text}");
}
