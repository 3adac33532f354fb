//! The ring, and every piece of memory the kernel reads or writes on its behalf. All of this
//! backend's `unsafe` lives in this module, in the files named after the kernel's concepts:
//! [`submission`] (queueing operations and the memory they own), [`completion`] (what comes
//! back), [`operations`] (one method per operation), [`buf_ring`] (provided buffers) and
//! [`probe`] (what this kernel supports).
//!
//! Contract: the rest of the backend queues operations through safe methods that take
//! descriptors the caller holds (`BorrowedFd`), addresses, and provided buffers by group and
//! id; no safe method takes a raw pointer or adopts a raw descriptor. Each operation is given a
//! *tag* (the backend's own name for it), and its completion gives the tag back:
//! - the ring allocates the user data itself: an entry in its operation slab, which owns the
//!   memory the operation needs (a socket address, a `msghdr`, the eventfd's 8 bytes) until the
//!   operation's final completion, so no pointer given to the kernel can dangle;
//! - provided buffers live in memory the ring owns for its whole life, and a buffer's bytes are
//!   handed out only between the completion that filled it and [`Ring::recycle`];
//! - a descriptor an accept returns is adopted by the ring, once, into the completion's socket.
//!
//! What the caller must still do: keep each descriptor open until its operations' final
//! completions (the backend's closing maps do; see [`crate::inflight`]).

mod buf_ring;
mod completion;
mod operations;
mod probe;
mod submission;

use std::io;

use io_uring::IoUring;

pub use probe::{Unavailable, probe};

pub(crate) use buf_ring::Span;
pub(crate) use completion::Completion;
pub(crate) use operations::recvmsg_layout;
use submission::Pending;

/// Which provided-buffer ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Group {
    /// TCP receives.
    Tcp = 0,
    /// UDP datagrams (with their `recvmsg` header, address and control data).
    Udp = 1,
}

/// Settings of one ring.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RingOptions {
    pub(crate) entries: u32,
    pub(crate) sqpoll: bool,
    /// Count (a power of two) and size of the TCP buffers.
    pub(crate) tcp_buffers: (u16, usize),
    /// Count (a power of two) and size of the UDP buffers.
    pub(crate) udp_buffers: (u16, usize),
}

/// A worker's io_uring with its buffer rings and operations in flight.
pub(crate) struct Ring {
    // Field order matters: the ring is dropped (its operations torn down and its buffer groups
    // released) before the buffer memory is unmapped and the operations' memory freed.
    ring: IoUring,
    buffers: [buf_ring::BufRing; 2],
    pending: slab::Slab<Pending>,
}

impl Ring {
    /// Sets up a ring for the calling thread: single issuer, deferred task running (fewer
    /// interruptions of the worker), falling back to plain setup on kernels without them; or
    /// with a submission-polling kernel thread when `sqpoll`. Registers both buffer rings.
    pub(crate) fn new(options: RingOptions) -> io::Result<Self> {
        let cq = options.entries * 4;
        let attempts: [&dyn Fn() -> io::Result<IoUring>; 2] = if options.sqpoll {
            [
                &|| {
                    IoUring::builder()
                        .setup_sqpoll(1000)
                        .setup_cqsize(cq)
                        .build(options.entries)
                },
                &|| IoUring::builder().setup_sqpoll(1000).build(options.entries),
            ]
        } else {
            [
                &|| {
                    IoUring::builder()
                        .setup_single_issuer()
                        .setup_defer_taskrun()
                        .setup_taskrun_flag()
                        .setup_cqsize(cq)
                        .build(options.entries)
                },
                &|| IoUring::builder().setup_cqsize(cq).build(options.entries),
            ]
        };
        let mut last = io::Error::other("io_uring setup failed");
        for attempt in attempts {
            match attempt() {
                Ok(ring) => {
                    let (count, size) = options.tcp_buffers;
                    let tcp = buf_ring::BufRing::new(&ring, Group::Tcp as u16, count, size)?;
                    let (count, size) = options.udp_buffers;
                    let udp = buf_ring::BufRing::new(&ring, Group::Udp as u16, count, size)?;
                    return Ok(Self {
                        ring,
                        buffers: [tcp, udp],
                        pending: slab::Slab::new(),
                    });
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The first `len` bytes of buffer `bid` of `group`, which a completion has just filled
    /// and which is not recycled yet.
    pub(crate) fn bytes(&self, group: Group, bid: u16, len: usize) -> &[u8] {
        self.buffers[group as usize].bytes(bid, len)
    }

    /// Gives buffer `bid` back to the kernel. Its bytes must not be used afterwards.
    pub(crate) fn recycle(&mut self, group: Group, bid: u16) {
        self.buffers[group as usize].recycle(bid);
    }

    /// Operations in flight (tests look at it).
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.pending.len()
    }
}
