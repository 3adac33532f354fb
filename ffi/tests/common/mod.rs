//! Shared by the C and Go test drivers: the static library they link.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `target/<profile>`, where cargo put this test.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// Builds the static library (`cargo test` builds only the rlib) and returns its directory.
pub fn static_lib_dir() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = target_dir();
            let mut cargo = Command::new(env!("CARGO"));
            cargo.args(["build", "-p", "svcproxy-ffi", "--lib"]);
            if dir.ends_with("release") {
                cargo.arg("--release");
            }
            let out = cargo
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "building the static library failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(dir.join("libsvcproxy_ffi.a").exists());
            dir
        })
        .clone()
}
