//! Runs `go vet`, the Go package's tests under the race detector, and its example, linked
//! against the static library with the documented link line. The Go used is the current one
//! at /usr/local/go when it is there (else `go` on PATH). Without a Go toolchain the tests are
//! skipped (and say so), except under CI (`CI` set), where they must run.

use std::path::PathBuf;
use std::process::Command;

mod common;

/// `go`, or `None` (skipping) when it is not installed and this is not CI.
fn go() -> Option<Command> {
    let current = PathBuf::from("/usr/local/go/bin/go");
    let go = if current.exists() {
        current
    } else {
        PathBuf::from("go")
    };
    let found = Command::new(&go)
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "Go is required under CI (/usr/local/go)"
        );
        eprintln!("skipped: no Go toolchain (install Go to run the Go tests)");
        return None;
    }
    let mut cmd = Command::new(go);
    cmd.current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("go"))
        .env("CGO_ENABLED", "1")
        .env(
            "CGO_LDFLAGS",
            format!("-L{}", common::static_lib_dir().display()),
        )
        .env("GOFLAGS", "-count=1");
    Some(cmd)
}

/// The output of `go`'s run, asserting it succeeded.
fn run(mut go: Command, args: &[&str]) -> String {
    let out = go.args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "go {} failed:\n{text}",
        args.join(" ")
    );
    text
}

#[test]
fn go_vet_is_clean() {
    let Some(go) = go() else { return };
    run(go, &["vet", "./..."]);
}

#[test]
fn go_package_tests_pass_under_the_race_detector() {
    let Some(go) = go() else { return };
    let text = run(go, &["test", "-race", "-v", "./..."]);
    for test in [
        "TestStartTrafficStatsAndShutdown",
        "TestTableChangesWhileRunning",
        "TestErrors",
        "TestSocketLBConnectsStraightToTheEndpoint",
        "TestDurationsRoundUpToMillisecondsAndLongWaitsAreClamped",
        "TestOneProxyFromManyGoroutines",
        "TestNodeOptionsReachTheTable",
        "TestSpliceForwardingOnIoUring",
        "TestPreserveClientIP",
        "TestBadOptionsAreNamed",
    ] {
        assert!(
            text.contains(&format!("--- PASS: {test}")),
            "{test} did not pass:\n{text}"
        );
    }
}

#[test]
fn go_example_goes_round_robin() {
    let Some(go) = go() else { return };
    let text = run(go, &["run", "./examples/roundrobin"]);
    let answers: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split("answered by ").nth(1))
        .collect();
    assert_eq!(answers.len(), 6, "{text}");
    assert!(answers.windows(2).all(|w| w[0] != w[1]), "{text}");
}

/// What the README tells another module to write: a `require` of the package's module path
/// and a `replace` line pointing at this checkout.
#[test]
fn another_module_imports_the_package_with_a_replace_line() {
    let Some(mut go) = go() else { return };
    let package = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("go");
    let module = std::env::temp_dir().join(format!("svcproxy-embedder-{}", std::process::id()));
    std::fs::create_dir_all(&module).unwrap();
    std::fs::write(
        module.join("go.mod"),
        format!(
            "module example.com/embedder\n\ngo 1.19\n\n\
             require github.com/svcproxy/svcproxy/ffi/go v0.0.0\n\n\
             replace github.com/svcproxy/svcproxy/ffi/go => {}\n",
            package.display()
        ),
    )
    .unwrap();
    std::fs::write(
        module.join("main.go"),
        "package main\n\nimport (\n\t\"fmt\"\n\n\tsvcproxy \"github.com/svcproxy/svcproxy/ffi/go\"\n)\n\n\
         func main() {\n\tp, err := svcproxy.New(svcproxy.DefaultOptions())\n\tif err != nil {\n\t\tpanic(err)\n\t}\n\
         \tdefer p.Close()\n\tfmt.Println(\"embedded svcproxy\", svcproxy.Version())\n}\n",
    )
    .unwrap();
    go.current_dir(&module);
    let text = run(go, &["run", "."]);
    std::fs::remove_dir_all(&module).unwrap();
    assert!(
        text.contains(&format!("embedded svcproxy {}", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
}
