//! What comes back: one [`Completion`] per completion queue entry, with the operation's tag,
//! its result, and for an accept the new socket. The operation's slab entry (and the memory it
//! owns) goes with its final completion.

use std::os::fd::{FromRawFd, OwnedFd};

use io_uring::cqueue;
use socket2::Socket;

use super::Ring;
use super::submission::{Kind, UNTRACKED};

/// One completion.
#[derive(Debug)]
pub(crate) struct Completion {
    /// The tag the operation was queued with.
    pub(crate) tag: u64,
    /// The result: non-negative on success, a negated errno on failure.
    pub(crate) result: i32,
    flags: u32,
    accepted: Option<Socket>,
}

impl Completion {
    /// Whether more completions of this (multishot) operation will follow.
    pub(crate) fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    /// The provided buffer the operation used, if any.
    pub(crate) fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }

    /// The socket an accept returned.
    pub(crate) fn take_accepted(&mut self) -> Option<Socket> {
        self.accepted.take()
    }
}

impl Ring {
    /// Moves the available completions into `out`, ending finished operations.
    pub(crate) fn completions(&mut self, out: &mut Vec<Completion>) {
        out.clear();
        for cqe in self.ring.completion() {
            let key = cqe.user_data();
            if key == UNTRACKED {
                continue;
            }
            let Some(pending) = self.pending.get(key as usize) else {
                continue;
            };
            let (tag, kind) = (pending.tag, pending.kind);
            let (result, flags) = (cqe.result(), cqe.flags());
            if !cqueue::more(flags) {
                self.pending.remove(key as usize);
            }
            let accepted = (kind == Kind::Accept && result >= 0).then(|| {
                // SAFETY: a non-negative result of an accept this ring queued is a new
                // descriptor the kernel opened for this process; this completion is the only
                // place it is seen, so it is adopted exactly once.
                Socket::from(unsafe { OwnedFd::from_raw_fd(result) })
            });
            out.push(Completion {
                tag,
                result,
                flags,
                accepted,
            });
        }
    }
}
