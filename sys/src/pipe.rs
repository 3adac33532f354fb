//! Pipes for zero-copy forwarding with splice(2): socket -> pipe -> socket.
//!
//! Both ends are non-blocking. Note the trap (DESIGN-NOTES section 3): `fill` returning
//! `WouldBlock` means "socket empty" only if the pipe was empty; with bytes in the pipe it may
//! mean "pipe full" (every skb fragment takes a pipe slot). Callers track the bytes they hold.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};

/// A pipe used as a zero-copy buffer between two sockets.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// A pipe of about `size` bytes (rounded by the kernel; if the kernel refuses the size, the
    /// default size is kept and reported by [`Pipe::capacity`]).
    pub fn new(size: usize) -> io::Result<Self> {
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        let capacity = match fcntl_setpipe_size(&write, size) {
            Ok(c) => c,
            Err(_) => rustix::pipe::fcntl_getpipe_size(&write)?,
        };
        Ok(Self {
            read,
            write,
            capacity,
        })
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Moves up to `len` bytes from `socket` into the pipe. `Ok(0)` is end of stream.
    #[inline]
    pub fn fill(&self, socket: impl AsFd, len: usize) -> io::Result<usize> {
        let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
        Ok(splice(socket, None, &self.write, None, len, flags)?)
    }

    /// Moves up to `len` bytes from the pipe into `socket`.
    #[inline]
    pub fn drain(&self, socket: impl AsFd, len: usize) -> io::Result<usize> {
        let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
        Ok(splice(&self.read, None, socket, None, len, flags)?)
    }
}
