//! The behaviour suite against the io_uring backend with a submission-polling kernel thread
//! (`IORING_SETUP_SQPOLL`): the kernel takes submissions while the worker is still queueing
//! them, so anything queued in parts (a connect and its linked timeout) can be seen half-way.

mod behaviour;

suite!(svcproxy::BackendKind::IoUring, 104, |c| c.io_uring.sqpoll =
    true);
