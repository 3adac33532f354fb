//! svcproxy's epoll backend: a driver of the core's connection engine
//! ([`svcproxy_core::engine`]), which decides everything about listeners, admission,
//! connection lifecycle (connect attempts and deadlines, half-close, resets, idle, drain,
//! shutdown), UDP flows and timers. This crate turns the engine's commands into system calls
//! and epoll events into the engine's events, and moves the bytes.
//!
//! [`run`] is the body of one worker thread. Each worker has its own epoll instance (edge
//! triggered), its own `SO_REUSEPORT` listener per service frontend (the kernel spreads clients
//! over workers), its own connections and its own UDP flow table; workers share only the
//! service table and the [`Control`](svcproxy_core::Control) block. The facade crate
//! (`svcproxy`) starts the workers and wakes them when the table is published. The loop waits
//! for events or the engine's next deadline, whichever comes first.
//!
//! What this crate does itself:
//! - TCP: accept, open a non-blocking backend socket and connect, then forward with splice(2)
//!   through pipes taken from a pool only while bytes flow, or by copy for small transfers
//!   ([`svcproxy_sys::stream`]'s pump, driven by the sockets' events).
//! - UDP: datagrams are received in batches, mapped to flows by the engine, sent to the
//!   endpoint through a connected socket per flow (consecutive datagrams of a flow in one
//!   `sendmmsg`), and replies go back through the listener from the exact address the client
//!   sent to (`udp.rs`).

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
/// publish and when shutdown begins. Run it under [`svcproxy_core::supervise`], which
/// restarts it after a failure and reports when it has stopped.
pub fn run(ctx: WorkerContext, waker: Arc<Waker>) -> io::Result<()> {
    worker::Worker::new(ctx, waker).and_then(|mut w| w.run())
}
