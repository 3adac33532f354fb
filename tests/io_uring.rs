//! The behaviour suite against the io_uring backend (default: provided-buffer forwarding).

mod behaviour;

suite!(svcproxy::BackendKind::IoUring, 102);
