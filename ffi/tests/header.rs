//! The checked-in header `ffi/include/svcproxy.h` is what cbindgen generates from the sources.
//! Regenerate it with `SVCPROXY_BLESS=1 cargo test -p svcproxy-ffi --test header`.

use std::path::PathBuf;

#[test]
fn header_is_up_to_date() {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut generated);
    let path = crate_dir.join("include/svcproxy.h");
    if std::env::var_os("SVCPROXY_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let checked_in = std::fs::read(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "ffi/include/svcproxy.h is stale: run SVCPROXY_BLESS=1 cargo test -p svcproxy-ffi --test header"
    );
}
