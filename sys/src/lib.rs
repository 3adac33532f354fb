//! Linux plumbing shared by svcproxy's backends: sockets set up the way a service proxy needs
//! them, pipes for splice, the stream pump that forwards a TCP connection from readiness,
//! batched datagram I/O with the local-address ancillary data that reverse translation needs,
//! and an eventfd waker.
//!
//! Contract: every function here is a thin, safe wrapper over one or a few system calls, with
//! no policy of its own (policy lives in `svcproxy-core`), except [`stream`]: the one
//! forwarding loop both backends drive, so that it is written once. Non-blocking descriptors everywhere:
//! `WouldBlock` is an ordinary result, never a reason to wait. Every `unsafe` block of the
//! epoll backend lives in this crate, each with a `// SAFETY:` comment; most calls go through
//! `rustix` and `socket2`, which are safe.

#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod ancillary;
pub mod dgram;
pub mod fd_passing;
pub mod limits;
pub mod pipe;
pub mod socket;
pub mod stream;
pub mod waker;

pub use dgram::{Datagram, RecvBatch, send_many};
pub use pipe::{Pipe, PipePool};
pub use socket::{
    ListenOptions, accept, adopt_flow, adopt_listener, connect, listen, listen_or_adopt,
    local_addr, outbound, reset,
};
pub use waker::Waker;
