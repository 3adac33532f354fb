//! svcproxy's io_uring backend: a driver of the core's connection engine
//! ([`svcproxy_core::engine`]), which decides everything about listeners, admission,
//! connection lifecycle, UDP flows and timers; this crate turns its commands into ring
//! operations and completions into its events.
//!
//! [`run`] is the body of one worker thread: one ring per worker (single issuer, deferred task
//! running; or a submission-polling kernel thread), its own `SO_REUSEPORT` listeners, its own
//! connections and UDP flows. Socket I/O is ring operations: multishot accept, connect,
//! receive into provided buffers and send, poll, cancel; UDP with multishot `recvmsg` and
//! `sendmsg`. Direct system calls: creating sockets, `shutdown(2)` of a write side (the ring
//! would hand `IORING_OP_SHUTDOWN` to an io-wq thread), and, with splice forwarding, the
//! splice(2), read and write calls of [`svcproxy_sys::stream`]'s pump once a poll reports a
//! socket ready (the ring would run `IORING_OP_SPLICE` on io-wq threads too).
//! The worker waits in `io_uring_enter` for the next completion; one ring timeout kept armed
//! for the engine's next deadline ends the wait by then, so timers fire on time and a connect
//! whose deadline passes is cancelled.
//!
//! Behaviour is the epoll backend's: the same behaviour suite runs against both.
//! [`probe`] says whether io_uring can be used here; the facade falls back to epoll if not.

#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod inflight;
// The only module with unsafe code: the ring, its buffers and the probe.
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
/// publish and when shutdown begins. Run it under [`svcproxy_core::supervise`], which
/// restarts it after a failure and reports when it has stopped.
pub fn run(ctx: WorkerContext, waker: Arc<Waker>) -> io::Result<()> {
    worker::Worker::new(ctx, waker).and_then(|mut w| w.run())
}
