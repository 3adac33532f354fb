//! The behaviour suite against the io_uring backend with splice forwarding.

mod behaviour;

suite!(svcproxy::BackendKind::IoUring, 103, |c| {
    c.io_uring.forwarding = svcproxy::Forwarding::Splice
});
