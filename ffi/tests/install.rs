//! The library as C users install it: `cargo cinstall` (cargo-c) into a staging directory and
//! `ffi/localize.sh` over the static library, then the C example built with what `pkg-config
//! svcproxy` says, against the shared library (which must carry the ABI's SONAME) and against
//! the static one (which must export only the C API), and run. Without cargo-c the test is
//! skipped (and says so), except under CI (`CI` set), where it must run.

use std::path::{Path, PathBuf};
use std::process::Command;

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What `pkg-config` says for `args`, with the installed prefix moved to `staged`.
fn pkg_config(staged: &Path, args: &[&str]) -> Vec<String> {
    let prefix = staged.join("usr/local");
    ok(Command::new("pkg-config")
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .arg(format!("--define-variable=prefix={}", prefix.display()))
        .args(args)
        .arg("svcproxy"))
    .split_whitespace()
    .map(str::to_string)
    .collect()
}

/// Builds the C example with `flags` and runs it; asserts it went round robin.
fn build_and_run(staged: &Path, name: &str, flags: &[String]) -> PathBuf {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/c/roundrobin.c");
    let program = staged.join(name);
    ok(Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror"])
        .args(pkg_config(staged, &["--cflags"]))
        .arg(example)
        .args(flags)
        .arg("-o")
        .arg(&program));
    let out = ok(Command::new(&program).env("LD_LIBRARY_PATH", staged.join("usr/local/lib")));
    let answers: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split("answered by ").nth(1))
        .collect();
    assert_eq!(answers.len(), 6, "{name}: {out}");
    assert!(answers.windows(2).all(|w| w[0] != w[1]), "{name}: {out}");
    program
}

#[test]
fn cargo_c_installs_a_library_that_pkg_config_finds() {
    let found = Command::new(env!("CARGO"))
        .args(["cinstall", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "cargo-c is required under CI (cargo install cargo-c)"
        );
        eprintln!("skipped: cargo-c is not installed (cargo install cargo-c)");
        return;
    }
    let staged = std::env::temp_dir().join(format!("svcproxy-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staged);
    ok(Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["cinstall", "--debug", "--locked", "-p", "svcproxy-ffi"])
        .arg("--destdir")
        .arg(&staged)
        .args(["--prefix", "/usr/local", "--libdir", "lib"]));
    let lib = staged.join("usr/local/lib");
    let minor = env!("CARGO_PKG_VERSION_MINOR");
    for file in [
        "libsvcproxy.a".to_string(),
        format!("libsvcproxy.so.0.{minor}"),
        "pkgconfig/svcproxy.pc".to_string(),
        "../include/svcproxy.h".to_string(),
    ] {
        assert!(lib.join(&file).exists(), "{file} is not installed");
    }
    let soname = ok(Command::new("readelf")
        .arg("-d")
        .arg(lib.join("libsvcproxy.so")));
    assert!(
        soname.contains(&format!("Library soname: [libsvcproxy.so.0.{minor}]")),
        "{soname}"
    );

    // Linked against the shared library: the program records the SONAME it needs.
    let dynamic = build_and_run(
        &staged,
        "roundrobin-shared",
        &pkg_config(&staged, &["--libs"]),
    );
    let needed = ok(Command::new("readelf").arg("-d").arg(&dynamic));
    assert!(
        needed.contains(&format!("Shared library: [libsvcproxy.so.0.{minor}]")),
        "{needed}"
    );
    // The static library, made to export only the C API.
    let archive = lib.join("libsvcproxy.a");
    ok(Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/localize.sh"))
        .args([&archive, &archive]));
    let symbols = ok(Command::new("nm")
        .args(["--defined-only", "--extern-only", "--format=posix"])
        .arg(&archive));
    let exported: Vec<&str> = symbols
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| !name.ends_with(':') && !name.ends_with(".o"))
        .collect();
    assert!(
        exported.len() > 10 && exported.iter().all(|n| n.starts_with("svcproxy_")),
        "{} symbols exported, not all the API's: {:?}",
        exported.len(),
        exported
            .iter()
            .filter(|n| !n.starts_with("svcproxy_"))
            .take(10)
            .collect::<Vec<_>>()
    );
    // Linked against the static library, with the private libraries pkg-config lists.
    let mut flags = vec![format!("{}/libsvcproxy.a", lib.display())];
    flags.extend(
        pkg_config(&staged, &["--static", "--libs"])
            .into_iter()
            .filter(|f| f != "-lsvcproxy" && !f.starts_with("-L")),
    );
    let fixed = build_and_run(&staged, "roundrobin-static", &flags);
    let needed = ok(Command::new("readelf").arg("-d").arg(&fixed));
    assert!(!needed.contains("libsvcproxy"), "{needed}");
    std::fs::remove_dir_all(&staged).unwrap();
}
