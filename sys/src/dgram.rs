//! Batched datagram I/O with recvmmsg(2)/sendmmsg(2), carrying each datagram's local address.
//!
//! [`RecvBatch`] receives up to its capacity in one call and reports, per datagram, the
//! sender, the local address it was sent to (from `IP_PKTINFO` / `IPV6_PKTINFO`, which
//! [`listen`](crate::listen) enables) and whether it was truncated. [`send_many`] sends several
//! payloads in one call, optionally to one destination and from one local source address (the
//! service address: reverse translation). Message headers are built on the stack for each call,
//! so no pointer into a buffer outlives the call that uses it.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};
use std::ptr;

use socket2::SockAddr;

/// Most datagrams per call.
pub const MAX_BATCH: usize = 64;
/// Largest UDP payload over IPv4 (65,535 - 8 - 20), and the slot size that carries it.
pub const MAX_DATAGRAM: usize = 65_507;

/// Ancillary data space per message: enough for one `in6_pktinfo` (the larger of the two).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct ControlSpace([u8; 64]);

#[derive(Debug, Clone, Copy)]
struct Meta {
    len: usize,
    peer: Option<SocketAddr>,
    local: Option<IpAddr>,
    truncated: bool,
}

/// Buffers for receiving a batch of datagrams.
pub struct RecvBatch {
    slot: usize,
    data: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    controls: Vec<ControlSpace>,
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
    /// Local address the datagram was sent to, when the socket reports it.
    pub local: Option<IpAddr>,
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
            // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
            names: vec![unsafe { zeroed() }; count],
            controls: vec![ControlSpace([0; 64]); count],
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
            h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iovecs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.controls[i].0.as_mut_ptr().cast();
            h.msg_controllen = size_of::<ControlSpace>();
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
        for header in headers.iter().take(n as usize) {
            let h = &header.msg_hdr;
            // SAFETY: the kernel filled `msg_name` (one of `self.names`) with `msg_namelen`
            // bytes of a socket address.
            let peer = unsafe { socket_addr(h.msg_name.cast(), h.msg_namelen) };
            // SAFETY: `h` is a header the kernel just completed; its control pointer and
            // length describe the ancillary data it wrote into our control space.
            let local = unsafe { pktinfo_local(h) };
            self.received.push(Meta {
                len: (header.msg_len as usize).min(self.slot),
                peer,
                local,
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
            local: m.local,
            truncated: m.truncated,
        }
    }
}

/// Reads a socket address the kernel wrote.
///
/// # Safety
/// `name` must point to at least `len` initialised bytes of a `sockaddr` family.
unsafe fn socket_addr(
    name: *const libc::sockaddr_storage,
    len: libc::socklen_t,
) -> Option<SocketAddr> {
    let len = len as usize;
    // SAFETY: the caller guarantees `name` is readable; the family field comes first.
    let family = unsafe { (*name).ss_family } as libc::c_int;
    match family {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says sockaddr_in and the length covers it.
            let sin = unsafe { ptr::read_unaligned(name.cast::<libc::sockaddr_in>()) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family says sockaddr_in6 and the length covers it.
            let sin6 = unsafe { ptr::read_unaligned(name.cast::<libc::sockaddr_in6>()) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let port = u16::from_be(sin6.sin6_port);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                port,
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The destination address from a received message's `IP_PKTINFO` / `IPV6_PKTINFO`.
///
/// # Safety
/// `h` must be a message header completed by the kernel, whose control pointer and length
/// describe initialised ancillary data.
unsafe fn pktinfo_local(h: &libc::msghdr) -> Option<IpAddr> {
    if h.msg_control.is_null() || h.msg_controllen == 0 {
        return None;
    }
    // SAFETY: per the contract the control buffer is valid; the CMSG macros stay within
    // `msg_controllen` and return null at its end.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            let level = (*c).cmsg_level;
            let kind = (*c).cmsg_type;
            if level == libc::IPPROTO_IP && kind == libc::IP_PKTINFO {
                let info = ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::in_pktinfo>());
                return Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    info.ipi_addr.s_addr,
                ))));
            }
            if level == libc::IPPROTO_IPV6 && kind == libc::IPV6_PKTINFO {
                let info = ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::in6_pktinfo>());
                return Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
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
    let name = to.map(SockAddr::from);
    let mut control = ControlSpace([0; 64]);
    let control_len = match from {
        Some(ip) => write_pktinfo(&mut control, ip),
        None => 0,
    };
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
        if let Some(name) = &name {
            h.msg_name = name.as_ptr() as *mut libc::c_void;
            h.msg_namelen = name.len();
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

/// Writes a pktinfo control message that sets the source address; returns its length.
fn write_pktinfo(control: &mut ControlSpace, ip: IpAddr) -> usize {
    // SAFETY: a zeroed msghdr is valid; we only point it at `control` so the CMSG macros can
    // lay out one message inside its 64 bytes, which fit either pktinfo (CMSG_SPACE ≤ 40).
    unsafe {
        let mut h: libc::msghdr = zeroed();
        h.msg_control = control.0.as_mut_ptr().cast();
        h.msg_controllen = size_of::<ControlSpace>();
        let c = libc::CMSG_FIRSTHDR(&h);
        match ip {
            IpAddr::V4(v4) => {
                let mut info: libc::in_pktinfo = zeroed();
                info.ipi_spec_dst.s_addr = u32::from(v4).to_be();
                (*c).cmsg_level = libc::IPPROTO_IP;
                (*c).cmsg_type = libc::IP_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as usize;
                ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
                libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) as usize
            }
            IpAddr::V6(v6) => {
                let mut info: libc::in6_pktinfo = zeroed();
                info.ipi6_addr.s6_addr = v6.octets();
                (*c).cmsg_level = libc::IPPROTO_IPV6;
                (*c).cmsg_type = libc::IPV6_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<libc::in6_pktinfo>() as u32) as usize;
                ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
                libc::CMSG_SPACE(size_of::<libc::in6_pktinfo>() as u32) as usize
            }
        }
    }
}
