//! One method per operation the backend uses. Each takes the descriptors it acts on as
//! `BorrowedFd`s, its buffers by group and id, and the caller's tag.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use io_uring::opcode;
use io_uring::types::{CancelBuilder, Fd, Timespec};
use svcproxy_sys::ancillary::{NameBuf, write_pktinfo, write_sockaddr};

use super::submission::{Kind, Memory, SendMsgMemory};
use super::{Group, Ring, Span};

/// Room for the peer address in a multishot `recvmsg` buffer.
pub(crate) const RECVMSG_NAME: usize = std::mem::size_of::<libc::sockaddr_in6>();
/// Room for the pktinfo control message in a multishot `recvmsg` buffer.
pub(crate) const RECVMSG_CONTROL: usize = 64;

fn fd(fd: BorrowedFd<'_>) -> Fd {
    Fd(fd.as_raw_fd())
}

/// An all-zero `msghdr` (null pointers, zero lengths).
pub(crate) fn zeroed_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is a plain C struct for which all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

/// The layout a multishot `recvmsg` result is parsed with, and the header such a receive is
/// queued with (the kernel reads only the two lengths).
pub(crate) fn recvmsg_layout() -> libc::msghdr {
    let mut h = zeroed_msghdr();
    h.msg_namelen = RECVMSG_NAME as libc::socklen_t;
    h.msg_controllen = RECVMSG_CONTROL;
    h
}

impl Ring {
    /// An accept: multishot when `many` (one completion per client, until cancelled), else of
    /// one client. Each completion carries the accepted socket.
    pub(crate) fn accept(
        &mut self,
        listener: BorrowedFd<'_>,
        many: bool,
        tag: u64,
    ) -> io::Result<()> {
        let flags = libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
        let entry = if many {
            opcode::AcceptMulti::new(fd(listener)).flags(flags).build()
        } else {
            opcode::Accept::new(fd(listener), std::ptr::null_mut(), std::ptr::null_mut())
                .flags(flags)
                .build()
        };
        // SAFETY: no pointers (the peer's address is not asked for).
        unsafe { self.push(entry, tag, Kind::Accept, Memory::None) }
    }

    /// A connect (its deadline is the caller's: cancel it when it passes).
    pub(crate) fn connect(
        &mut self,
        socket: BorrowedFd<'_>,
        to: SocketAddr,
        tag: u64,
    ) -> io::Result<()> {
        let mut name = Box::new(NameBuf::default());
        let len = write_sockaddr(to, &mut name);
        let addr = name.0.as_ptr().cast::<libc::sockaddr>();
        let entry = opcode::Connect::new(fd(socket), addr, len as libc::socklen_t).build();
        // SAFETY: the address points into `name`, kept with the operation.
        unsafe { self.push(entry, tag, Kind::Plain, Memory::Address(name)) }
    }

    /// A receive into a buffer of `group`.
    pub(crate) fn recv(
        &mut self,
        socket: BorrowedFd<'_>,
        group: Group,
        tag: u64,
    ) -> io::Result<()> {
        let entry = opcode::Recv::new(fd(socket), std::ptr::null_mut(), 0)
            .buf_group(group as u16)
            .build()
            .flags(io_uring::squeue::Flags::BUFFER_SELECT);
        // SAFETY: the kernel picks the buffer from the group's ring, which the ring owns.
        unsafe { self.push(entry, tag, Kind::Plain, Memory::None) }
    }

    /// A multishot receive into buffers of `group`.
    pub(crate) fn recv_multi(
        &mut self,
        socket: BorrowedFd<'_>,
        group: Group,
        tag: u64,
    ) -> io::Result<()> {
        let entry = opcode::RecvMulti::new(fd(socket), group as u16).build();
        // SAFETY: as for `recv`.
        unsafe { self.push(entry, tag, Kind::Plain, Memory::None) }
    }

    /// A multishot `recvmsg` into buffers of `group`, reporting peer and local address.
    pub(crate) fn recvmsg_multi(
        &mut self,
        socket: BorrowedFd<'_>,
        group: Group,
        tag: u64,
    ) -> io::Result<()> {
        let header = Box::new(recvmsg_layout());
        let entry = opcode::RecvMsgMulti::new(fd(socket), &*header, group as u16).build();
        // SAFETY: the header is kept with the operation; buffers come from the group's ring.
        unsafe { self.push(entry, tag, Kind::Plain, Memory::RecvMsg(header)) }
    }

    /// Sends the bytes of `span` on a connected socket; with `all`, all of them or fail
    /// (`MSG_WAITALL`).
    pub(crate) fn send(
        &mut self,
        socket: BorrowedFd<'_>,
        span: Span,
        all: bool,
        tag: u64,
    ) -> io::Result<()> {
        let (ptr, len) = self.buffers[span.group as usize].pointer(span)?;
        let flags = if all {
            libc::MSG_WAITALL | libc::MSG_NOSIGNAL
        } else {
            libc::MSG_NOSIGNAL
        };
        let entry = opcode::Send::new(fd(socket), ptr, len as u32)
            .flags(flags)
            .build();
        // SAFETY: the bytes are inside the group's buffer memory, which the ring owns.
        unsafe { self.push(entry, tag, Kind::Plain, Memory::None) }
    }

    /// Sends the bytes of `span` to `to` from local address `from`.
    pub(crate) fn sendmsg(
        &mut self,
        socket: BorrowedFd<'_>,
        span: Span,
        to: SocketAddr,
        from: IpAddr,
        tag: u64,
    ) -> io::Result<()> {
        let (ptr, len) = self.buffers[span.group as usize].pointer(span)?;
        // SAFETY: all zeroes is a valid msghdr and iovec; every field used is set below.
        let mut m: Box<SendMsgMemory> = Box::new(unsafe { std::mem::zeroed() });
        let name_len = write_sockaddr(to, &mut m.name);
        let control_len = write_pktinfo(from, &mut m.control);
        m.iov = libc::iovec {
            iov_base: ptr.cast_mut().cast(),
            iov_len: len,
        };
        m.header.msg_name = m.name.0.as_mut_ptr().cast();
        m.header.msg_namelen = name_len as libc::socklen_t;
        m.header.msg_iov = &mut m.iov;
        m.header.msg_iovlen = 1;
        m.header.msg_control = m.control.0.as_mut_ptr().cast();
        m.header.msg_controllen = control_len;
        let entry = opcode::SendMsg::new(fd(socket), &m.header)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build();
        // SAFETY: the header, address, control data and iovec are kept with the operation;
        // the iovec points into the group's buffer memory, which the ring owns.
        unsafe { self.push(entry, tag, Kind::Plain, Memory::SendMsg(m)) }
    }

    /// Completes once `socket` is ready for `events` (`POLLIN`, `POLLOUT`).
    pub(crate) fn poll(&mut self, socket: BorrowedFd<'_>, events: u32, tag: u64) -> io::Result<()> {
        let entry = opcode::PollAdd::new(fd(socket), events).build();
        // SAFETY: no pointers.
        unsafe { self.push(entry, tag, Kind::Plain, Memory::None) }
    }

    /// Cancels every operation on `socket`; each completes (with `-ECANCELED` unless it had
    /// finished), and the cancel itself reports nothing.
    pub(crate) fn cancel_fd(&mut self, socket: BorrowedFd<'_>) -> io::Result<()> {
        let entry = opcode::AsyncCancel2::new(CancelBuilder::fd(fd(socket)).all())
            .build()
            .flags(io_uring::squeue::Flags::SKIP_SUCCESS);
        self.push_untracked(entry)
    }

    /// Completes (with `-ETIME`) after `after`.
    pub(crate) fn timeout(&mut self, after: Duration, tag: u64) -> io::Result<()> {
        let ts = Box::new(Timespec::from(after));
        let entry = opcode::Timeout::new(&*ts).build();
        // SAFETY: the timespec is kept with the operation.
        unsafe { self.push(entry, tag, Kind::Plain, Memory::Timespec(ts)) }
    }

    /// Reads the 8-byte counter of an eventfd (to be woken from other threads).
    pub(crate) fn read_eventfd(&mut self, eventfd: BorrowedFd<'_>, tag: u64) -> io::Result<()> {
        let mut counter = Box::new([0u8; 8]);
        let entry = opcode::Read::new(fd(eventfd), counter.as_mut_ptr(), 8).build();
        // SAFETY: the counter is kept with the operation.
        unsafe { self.push(entry, tag, Kind::Plain, Memory::Counter(counter)) }
    }
}
