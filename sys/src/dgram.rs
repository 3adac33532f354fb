//! Batched datagram I/O with recvmmsg(2)/sendmmsg(2), carrying each datagram's local address.
//!
//! [`RecvBatch`] receives up to its capacity in one call and reports, per datagram, the
//! sender, where it was sent (the local address from `IP_PKTINFO` / `IPV6_PKTINFO`, or the
//! original destination on a transparent socket, which [`listen`](crate::listen) enables) and whether it was truncated. [`send_many`] sends several
//! payloads in one call, optionally to one destination and from one local source address (the
//! service address: reverse translation). Message headers are built on the stack for each call,
//! so no pointer into a buffer outlives the call that uses it.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::ptr;

use crate::ancillary::{
    ControlBuf, Destination, NameBuf, parse_destination, parse_sockaddr, write_pktinfo,
    write_sockaddr,
};

/// Most datagrams per call.
pub const MAX_BATCH: usize = 64;
/// Largest UDP payload over IPv4 (65,535 - 8 - 20), and the slot size that carries it.
pub const MAX_DATAGRAM: usize = 65_507;

#[derive(Debug, Clone, Copy)]
struct Meta {
    len: usize,
    peer: Option<SocketAddr>,
    destination: Destination,
    truncated: bool,
}

/// Buffers for receiving a batch of datagrams.
pub struct RecvBatch {
    slot: usize,
    data: Vec<u8>,
    names: Vec<NameBuf>,
    controls: Vec<ControlBuf>,
    received: Vec<Meta>,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("capacity", &self.names.len())
            .field("slot", &self.slot)
            .field("received", &self.received.len())
            .finish()
    }
}

/// One received datagram.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    /// Payload.
    pub data: &'a [u8],
    /// Sender (absent for a connected socket whose kernel omitted it).
    pub peer: Option<SocketAddr>,
    /// Where the datagram was sent, when the socket reports it.
    pub destination: Destination,
    /// The datagram was larger than the slot and was cut.
    pub truncated: bool,
}

impl RecvBatch {
    /// Room for `count` datagrams (at most [`MAX_BATCH`]) of up to `slot` bytes each.
    pub fn new(count: usize, slot: usize) -> Self {
        let count = count.clamp(1, MAX_BATCH);
        Self {
            slot,
            data: vec![0; count * slot],
            names: vec![NameBuf::default(); count],
            controls: vec![ControlBuf::default(); count],
            received: Vec::with_capacity(count),
        }
    }

    /// Receives as many datagrams as are waiting, up to the capacity, without blocking.
    /// `WouldBlock` when none is waiting. Returns the number received.
    pub fn recv(&mut self, socket: impl AsFd) -> io::Result<usize> {
        let count = self.names.len();
        self.received.clear();
        // SAFETY: iovec and mmsghdr are plain C structs for which all zeroes is valid
        // (null pointers, zero lengths); every entry used is filled in below.
        let mut iovecs: [libc::iovec; MAX_BATCH] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut headers: [libc::mmsghdr; MAX_BATCH] = unsafe { zeroed() };
        for i in 0..count {
            iovecs[i] = libc::iovec {
                iov_base: self.data[i * self.slot..].as_mut_ptr().cast(),
                iov_len: self.slot,
            };
            let h = &mut headers[i].msg_hdr;
            h.msg_name = self.names[i].0.as_mut_ptr().cast();
            h.msg_namelen = size_of::<NameBuf>() as libc::socklen_t;
            h.msg_iov = &mut iovecs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.controls[i].0.as_mut_ptr().cast();
            h.msg_controllen = size_of::<ControlBuf>();
        }
        // SAFETY: the first `count` headers point at buffers owned by `self` (data slots of
        // `slot` bytes, names, control space) and at `iovecs`, all of which outlive the call
        // and are not otherwise borrowed during it; `count` ≤ the array lengths.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_fd().as_raw_fd(),
                headers.as_mut_ptr(),
                count as libc::c_uint,
                libc::MSG_DONTWAIT,
                ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for (i, header) in headers.iter().take(n as usize).enumerate() {
            let h = &header.msg_hdr;
            let name = &self.names[i].0[..(h.msg_namelen as usize).min(size_of::<NameBuf>())];
            let control = &self.controls[i].0[..h.msg_controllen.min(size_of::<ControlBuf>())];
            self.received.push(Meta {
                len: (header.msg_len as usize).min(self.slot),
                peer: parse_sockaddr(name),
                destination: parse_destination(control),
                truncated: h.msg_flags & libc::MSG_TRUNC != 0,
            });
        }
        Ok(n as usize)
    }

    /// Most datagrams one receive takes.
    pub fn capacity(&self) -> usize {
        self.names.len()
    }

    /// Datagrams of the last [`RecvBatch::recv`].
    pub fn len(&self) -> usize {
        self.received.len()
    }

    /// Whether the last receive got nothing.
    pub fn is_empty(&self) -> bool {
        self.received.is_empty()
    }

    /// Datagram `i` of the last receive.
    pub fn get(&self, i: usize) -> Datagram<'_> {
        let m = self.received[i];
        Datagram {
            data: &self.data[i * self.slot..i * self.slot + m.len],
            peer: m.peer,
            destination: m.destination,
            truncated: m.truncated,
        }
    }
}

/// Sends `payloads` (at most [`MAX_BATCH`]) in one call, without blocking: to `to` (or the
/// connected peer), from local address `from` (or the socket's own). Returns how many were
/// sent; `WouldBlock` if none could be.
pub fn send_many(
    socket: impl AsFd,
    payloads: &[&[u8]],
    to: Option<SocketAddr>,
    from: Option<IpAddr>,
) -> io::Result<usize> {
    let count = payloads.len().min(MAX_BATCH);
    if count == 0 {
        return Ok(0);
    }
    let mut name = NameBuf::default();
    let name_len = to.map_or(0, |addr| write_sockaddr(addr, &mut name));
    let mut control = ControlBuf::default();
    let control_len = from.map_or(0, |ip| write_pktinfo(ip, &mut control));
    // SAFETY: plain C structs; all zeroes is valid and every used entry is filled below.
    let mut iovecs: [libc::iovec; MAX_BATCH] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut headers: [libc::mmsghdr; MAX_BATCH] = unsafe { zeroed() };
    for (i, payload) in payloads.iter().take(count).enumerate() {
        iovecs[i] = libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        };
        let h = &mut headers[i].msg_hdr;
        if name_len > 0 {
            h.msg_name = name.0.as_mut_ptr().cast();
            h.msg_namelen = name_len as libc::socklen_t;
        }
        h.msg_iov = &mut iovecs[i];
        h.msg_iovlen = 1;
        if control_len > 0 {
            h.msg_control = control.0.as_mut_ptr().cast();
            h.msg_controllen = control_len;
        }
    }
    // SAFETY: the headers point at `payloads` (read only by the kernel despite the `*mut`
    // iovec type), `name` and `control`, all alive and unmoved for the call; `count` ≤ the
    // array lengths.
    let n = unsafe {
        libc::sendmmsg(
            socket.as_fd().as_raw_fd(),
            headers.as_mut_ptr(),
            count as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
