//! svcproxy's io_uring backend.
//!
//! [`run`] is the body of one worker thread: one ring per worker (single issuer, deferred task
//! running; or a submission-polling kernel thread), its own `SO_REUSEPORT` listeners, its own
//! connections and UDP flows. Every socket operation is a ring operation: multishot accept,
//! connect with a linked timeout, receive into provided buffers (or splice through pipes),
//! send, shutdown, cancel; UDP with multishot `recvmsg` and `sendmsg`. The steady state makes
//! one `io_uring_enter` per batch of completions and no other system call per operation.
//! Timers are ring timeouts (a one-second tick for idle, drain and flow expiry; deadlines for
//! connects and shutdown).
//!
//! Behaviour is the epoll backend's: the same behaviour suite runs against both.
//! [`probe`] says whether io_uring can be used here; the facade falls back to epoll if not.

#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

// The only module with unsafe code: the ring, its buffers and the probe.
mod inflight;
#[allow(unsafe_code)]
mod ring;
mod tcp;
mod token;
mod udp;
mod worker;

use std::io;
use std::sync::Arc;

use svcproxy_core::WorkerContext;
use svcproxy_sys::Waker;

pub use ring::{Unavailable, probe};

/// Runs one worker until shutdown completes. `waker` must be signalled after each table
/// publish and when shutdown begins.
pub fn run(ctx: WorkerContext, waker: Arc<Waker>) -> io::Result<()> {
    let index = ctx.index;
    let control = ctx.control.clone();
    let result = worker::Worker::new(ctx, waker).and_then(|mut w| w.run());
    control.report_stopped(index);
    result
}
