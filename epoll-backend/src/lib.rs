//! svcproxy's epoll backend.
//!
//! [`run`] is the body of one worker thread. Each worker has its own epoll instance (edge
//! triggered), its own `SO_REUSEPORT` listener per service frontend (the kernel spreads clients
//! over workers), its own connections and its own UDP flow table; workers share only the
//! service table and the [`Control`](svcproxy_core::Control) block. The facade crate
//! (`svcproxy`) starts the workers and wakes them when the table is published.
//!
//! What a worker does:
//! - Listeners follow the table: a frontend whose service port has an eligible endpoint is
//!   listened on; one without (or gone) is closed, so clients get ECONNREFUSED at once.
//! - TCP: accept, pick an endpoint, connect without blocking, then forward with splice(2)
//!   through pipes taken from a pool only while bytes flow ([`tcp`]). Decisions (retries,
//!   half-close, resets, idle and drain) come from the core's TCP session policy.
//! - UDP: datagrams are received in batches, mapped to flows (core flow table), sent to the
//!   endpoint through a connected socket per flow, and replies go back through the listener
//!   from the exact address the client sent to ([`udp`]).
//! - Out of descriptors: accepting pauses with backoff and resumes; nothing spins or panics.

#![forbid(unsafe_code)]

mod tcp;
mod token;
mod udp;
mod worker;

use std::io;
use std::sync::Arc;

use svcproxy_core::WorkerContext;
use svcproxy_sys::Waker;

/// Runs one worker until shutdown completes. `waker` must be signalled after each table
/// publish and when shutdown begins.
pub fn run(ctx: WorkerContext, waker: Arc<Waker>) -> io::Result<()> {
    let index = ctx.index;
    let control = ctx.control.clone();
    let result = worker::Worker::new(ctx, waker).and_then(|mut w| w.run());
    control.report_stopped(index);
    result
}
