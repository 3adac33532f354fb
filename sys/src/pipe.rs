//! Pipes for zero-copy forwarding with splice(2): socket -> pipe -> socket.
//!
//! Both ends are non-blocking. Note the trap: `fill` returning `WouldBlock` means "socket
//! empty" only if the pipe was empty; with bytes in the pipe it may mean "pipe full" (every
//! skb fragment takes a pipe slot, so a 64 KiB pipe can fill at about 23 KiB of MSS-sized
//! segments). Callers track the bytes they hold.

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

    /// The read and write ends, for a ring's splice operations (the pipe stays their owner).
    pub fn fds(&self) -> (std::os::fd::BorrowedFd<'_>, std::os::fd::BorrowedFd<'_>) {
        (self.read.as_fd(), self.write.as_fd())
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

/// Spare empty pipes, so that connections take a pipe only while data flows and give it back
/// when idle (idle connections hold no pipes). Never give back a pipe
/// that still holds bytes: they would reach another connection.
#[derive(Debug)]
pub struct PipePool {
    free: Vec<Pipe>,
    size: usize,
    keep: usize,
}

impl PipePool {
    /// A pool of pipes of `size` bytes, keeping at most `keep` spare ones.
    pub fn new(size: usize, keep: usize) -> Self {
        Self {
            free: Vec::new(),
            size,
            keep,
        }
    }

    /// A spare pipe, or a new one.
    #[inline]
    pub fn take(&mut self) -> io::Result<Pipe> {
        match self.free.pop() {
            Some(p) => Ok(p),
            None => Pipe::new(self.size),
        }
    }

    /// Returns an empty pipe to the pool (closes it when the pool is full).
    #[inline]
    pub fn give(&mut self, pipe: Pipe) {
        if self.free.len() < self.keep {
            self.free.push(pipe);
        }
    }

    /// Closes every spare pipe (to give descriptors back when they run out).
    pub fn clear(&mut self) {
        self.free.clear();
    }
}
