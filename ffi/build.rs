//! Gives the shared library a SONAME, so that programs linked against it record the ABI they
//! need: `libsvcproxy_ffi.so.<major>`, or `.so.0.<minor>` before 1.0, where a minor version
//! may change the ABI (as cargo-c names them; the policy is in the README, "From C and Go").
//! Under cargo-c (feature `capi`), cargo-c names the library `libsvcproxy` and sets the same
//! kind of SONAME itself.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CAPI").is_some() {
        return;
    }
    let major = env!("CARGO_PKG_VERSION_MAJOR");
    let abi = match major {
        "0" => format!("0.{}", env!("CARGO_PKG_VERSION_MINOR")),
        _ => major.to_string(),
    };
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libsvcproxy_ffi.so.{abi}");
}
