//! The process's descriptor limit (RLIMIT_NOFILE).

use std::io;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The soft descriptor limit (no limit reads as 2^20, the kernel's default `nr_open`).
pub fn descriptor_limit() -> u64 {
    getrlimit(Resource::Nofile).current.unwrap_or(1 << 20)
}

/// Raises the soft descriptor limit to the hard one; returns the new soft limit.
pub fn raise_descriptor_limit() -> io::Result<u64> {
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        )?;
    }
    Ok(descriptor_limit())
}
