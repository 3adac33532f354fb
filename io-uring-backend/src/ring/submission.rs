//! Queueing operations: the operation slab (each entry is an operation in flight, its key the
//! user data, its contents the caller's tag and the memory the operation's pointers point
//! into), submitting and waiting.

use std::io;
use std::time::Duration;

use io_uring::squeue;
use io_uring::types::{SubmitArgs, Timespec};
use svcproxy_sys::ancillary::{ControlBuf, NameBuf};

use super::Ring;

/// User data of operations nobody waits for (a cancel's completion, sent only on failure).
pub(super) const UNTRACKED: u64 = u64::MAX;

/// Memory an operation in flight owns, boxed so that it never moves.
#[allow(dead_code, reason = "kept alive for the kernel, never read again")]
pub(super) enum Memory {
    None,
    Address(Box<NameBuf>),
    RecvMsg(Box<libc::msghdr>),
    SendMsg(Box<SendMsgMemory>),
    Counter(Box<[u8; 8]>),
    Timespec(Box<Timespec>),
}

/// What a `sendmsg` points into.
pub(super) struct SendMsgMemory {
    pub(super) header: libc::msghdr,
    pub(super) iov: libc::iovec,
    pub(super) name: NameBuf,
    pub(super) control: ControlBuf,
}

/// What a completion of the operation produces besides its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Plain,
    /// A non-negative result is a new descriptor for the ring to adopt.
    Accept,
}

/// An operation in flight.
pub(super) struct Pending {
    pub(super) tag: u64,
    pub(super) kind: Kind,
    _memory: Memory,
}

impl Ring {
    /// Queues `entry` as operation `tag`, keeping `memory` until its final completion.
    ///
    /// # Safety
    /// Every pointer in `entry` must point into `memory` or into this ring's buffer rings.
    pub(super) unsafe fn push(
        &mut self,
        entry: squeue::Entry,
        tag: u64,
        kind: Kind,
        memory: Memory,
    ) -> io::Result<()> {
        let key = self.pending.insert(Pending {
            tag,
            kind,
            _memory: memory,
        });
        let entry = entry.user_data(key as u64);
        // SAFETY: the pointers in `entry` point into memory now owned by the slab entry (or
        // into the buffer rings, which live as long as the ring); the entry is removed only at
        // the operation's final completion (see `completions`).
        let queued = unsafe { self.queue(&entry) };
        if queued.is_err() {
            self.pending.remove(key);
        }
        queued
    }

    /// Queues an operation whose completion nobody waits for and that points at nothing.
    pub(super) fn push_untracked(&mut self, entry: squeue::Entry) -> io::Result<()> {
        // SAFETY: the entry carries descriptors and numbers only.
        unsafe { self.queue(&entry.user_data(UNTRACKED)) }
    }

    /// Queues `entry`, submitting first while the submission queue is full.
    ///
    /// # Safety
    /// Every pointer in `entry` must stay valid until its operation's final completion.
    unsafe fn queue(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: passed on from the caller.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.submit()?;
        }
    }

    /// Submits what is queued without waiting.
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Submits what is queued and waits for at least one completion, or until `timeout` has
    /// passed.
    pub(crate) fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let result = match timeout {
            Some(t) => {
                let ts = Timespec::from(t);
                let args = SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ETIME)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}
