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
        let fd = socket.as_fd().as_raw_fd();
        self.recv_with(|headers| {
            // SAFETY: `recv_with` built the headers to point at buffers owned by `self` (a data
            // slot of `slot` bytes, a name and a control buffer each) and at its `iovecs`, all
            // alive, unmoved and not otherwise borrowed during this call; the count passed is
            // the headers' length.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    headers.as_mut_ptr(),
                    headers.len() as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    ptr::null_mut(),
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        })
    }

    /// Builds one message header per slot, each pointing into this batch's buffers, lets
    /// `receive` fill the first n of them (the kernel; a test stands in for it under Miri),
    /// and records what was received.
    fn recv_with(
        &mut self,
        receive: impl FnOnce(&mut [libc::mmsghdr]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let count = self.names.len();
        self.received.clear();
        // SAFETY: iovec and mmsghdr are plain C structs for which all zeroes is valid
        // (null pointers, zero lengths); every entry used is filled in below.
        let mut iovecs: [libc::iovec; MAX_BATCH] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut headers: [libc::mmsghdr; MAX_BATCH] = unsafe { zeroed() };
        // One mutable borrow of each buffer, split into disjoint parts: no pointer taken for
        // one header is invalidated by the borrow taken for the next.
        let slots = self
            .data
            .chunks_mut(self.slot)
            .zip(self.names.iter_mut())
            .zip(self.controls.iter_mut());
        for ((iovec, header), ((data, name), control)) in
            iovecs.iter_mut().zip(headers.iter_mut()).zip(slots)
        {
            *iovec = libc::iovec {
                iov_base: data.as_mut_ptr().cast(),
                iov_len: data.len(),
            };
            let h = &mut header.msg_hdr;
            h.msg_name = name.0.as_mut_ptr().cast();
            h.msg_namelen = size_of::<NameBuf>() as libc::socklen_t;
            h.msg_iov = iovec;
            h.msg_iovlen = 1;
            h.msg_control = control.0.as_mut_ptr().cast();
            h.msg_controllen = size_of::<ControlBuf>();
        }
        let n = receive(&mut headers[..count])?.min(count);
        for (i, header) in headers.iter().take(n).enumerate() {
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
        Ok(n)
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
    let fd = socket.as_fd().as_raw_fd();
    send_with(payloads, to, from, |headers| {
        // SAFETY: `send_with` built the headers to point at `payloads` (read only by the
        // kernel despite the `*mut` iovec type), its name and control buffers and its
        // `iovecs`, all alive and unmoved for this call; the count passed is the headers'
        // length.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                headers.as_mut_ptr(),
                headers.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    })
}

/// Builds one message header per payload (at most [`MAX_BATCH`]) and lets `send` pass them
/// to the kernel (a test stands in for it under Miri).
fn send_with(
    payloads: &[&[u8]],
    to: Option<SocketAddr>,
    from: Option<IpAddr>,
    send: impl FnOnce(&mut [libc::mmsghdr]) -> io::Result<usize>,
) -> io::Result<usize> {
    let count = payloads.len().min(MAX_BATCH);
    if count == 0 {
        return Ok(0);
    }
    let mut name = NameBuf::default();
    let name_len = to.map_or(0, |addr| write_sockaddr(addr, &mut name));
    let mut control = ControlBuf::default();
    let control_len = from.map_or(0, |ip| write_pktinfo(ip, &mut control));
    let name_ptr: *mut libc::c_void = name.0.as_mut_ptr().cast();
    let control_ptr: *mut libc::c_void = control.0.as_mut_ptr().cast();
    // SAFETY: plain C structs; all zeroes is valid and every used entry is filled below.
    let mut iovecs: [libc::iovec; MAX_BATCH] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut headers: [libc::mmsghdr; MAX_BATCH] = unsafe { zeroed() };
    for ((iovec, header), payload) in iovecs.iter_mut().zip(headers.iter_mut()).zip(payloads) {
        *iovec = libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        };
        let h = &mut header.msg_hdr;
        if name_len > 0 {
            h.msg_name = name_ptr;
            h.msg_namelen = name_len as libc::socklen_t;
        }
        h.msg_iov = iovec;
        h.msg_iovlen = 1;
        if control_len > 0 {
            h.msg_control = control_ptr;
            h.msg_controllen = control_len;
        }
    }
    send(&mut headers[..count])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Does what recvmmsg(2) does with the headers: writes each datagram into the buffers its
    /// header describes (the whole slot, cut where it is larger), the sender into the name,
    /// a pktinfo control message into the control buffer, and the lengths and flags back.
    fn kernel_receives(
        headers: &mut [libc::mmsghdr],
        datagrams: &[(Vec<u8>, SocketAddr)],
    ) -> usize {
        let local: IpAddr = "::1".parse().unwrap();
        for (header, (payload, from)) in headers.iter_mut().zip(datagrams) {
            let h = &mut header.msg_hdr;
            let mut name = NameBuf::default();
            let name_len = write_sockaddr(*from, &mut name);
            let mut control = ControlBuf::default();
            let control_len = write_pktinfo(local, &mut control);
            // SAFETY: this is the kernel's side: it writes within the lengths each header
            // gives, through the pointers the header holds (Miri checks they are valid).
            unsafe {
                let iovec = &*h.msg_iov;
                let n = payload.len().min(iovec.iov_len);
                std::ptr::write_bytes(iovec.iov_base.cast::<u8>(), 0xee, iovec.iov_len);
                std::ptr::copy_nonoverlapping(payload.as_ptr(), iovec.iov_base.cast(), n);
                assert!(name_len <= h.msg_namelen as usize);
                std::ptr::copy_nonoverlapping(name.0.as_ptr(), h.msg_name.cast(), name_len);
                assert!(control_len <= h.msg_controllen);
                std::ptr::copy_nonoverlapping(
                    control.0.as_ptr(),
                    h.msg_control.cast(),
                    control_len,
                );
                if payload.len() > iovec.iov_len {
                    h.msg_flags = libc::MSG_TRUNC;
                }
            }
            h.msg_namelen = name_len as libc::socklen_t;
            h.msg_controllen = control_len;
            header.msg_len = payload.len() as libc::c_uint;
        }
        headers.len().min(datagrams.len())
    }

    #[test]
    fn each_datagram_lands_in_its_own_slot_with_its_sender_and_destination() {
        let mut batch = RecvBatch::new(4, 16);
        let datagrams: Vec<(Vec<u8>, SocketAddr)> = vec![
            (b"one".to_vec(), "127.0.0.1:1001".parse().unwrap()),
            (vec![7; 16], "[::1]:1002".parse().unwrap()),
            (vec![9; 40], "127.0.0.2:1003".parse().unwrap()),
        ];
        let n = batch
            .recv_with(|headers| {
                assert_eq!(headers.len(), 4);
                Ok(kernel_receives(headers, &datagrams))
            })
            .unwrap();
        assert_eq!((n, batch.len()), (3, 3));
        for (i, (payload, from)) in datagrams.iter().enumerate() {
            let d = batch.get(i);
            let kept = payload.len().min(16);
            assert_eq!(d.data, &payload[..kept]);
            assert_eq!(d.peer, Some(*from));
            assert_eq!(d.destination.local, Some("::1".parse().unwrap()));
            assert_eq!(d.truncated, payload.len() > 16);
        }
        // A failed receive leaves nothing from the one before.
        let e = batch
            .recv_with(|_| Err(io::ErrorKind::WouldBlock.into()))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(batch.is_empty());
    }

    #[test]
    fn each_payload_goes_out_with_the_destination_and_source_given() {
        let payloads: Vec<Vec<u8>> = (0..MAX_BATCH + 3).map(|i| vec![i as u8; i]).collect();
        let payloads: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        let to: SocketAddr = "[2001:db8::5]:53".parse().unwrap();
        let from: IpAddr = "2001:db8::1".parse().unwrap();
        let sent = send_with(&payloads, Some(to), Some(from), |headers| {
            assert_eq!(headers.len(), MAX_BATCH);
            for (i, header) in headers.iter().enumerate() {
                let h = &header.msg_hdr;
                // SAFETY: the kernel's side of sendmmsg(2): it reads what each header points
                // at, within the lengths it gives.
                let (data, name, control) = unsafe {
                    let iovec = &*h.msg_iov;
                    (
                        std::slice::from_raw_parts(iovec.iov_base.cast::<u8>(), iovec.iov_len),
                        std::slice::from_raw_parts(h.msg_name.cast::<u8>(), h.msg_namelen as usize),
                        std::slice::from_raw_parts(h.msg_control.cast::<u8>(), h.msg_controllen),
                    )
                };
                assert_eq!(data, payloads[i]);
                assert_eq!(parse_sockaddr(name), Some(to));
                assert_eq!(parse_destination(control).local, Some(from));
            }
            Ok(headers.len())
        })
        .unwrap();
        assert_eq!(sent, MAX_BATCH);
        // Without a destination or a source, the headers carry neither.
        send_with(&payloads[..1], None, None, |headers| {
            let h = &headers[0].msg_hdr;
            assert!(h.msg_name.is_null() && h.msg_control.is_null());
            Ok(1)
        })
        .unwrap();
        assert_eq!(send_with(&[], None, None, |_| unreachable!()).unwrap(), 0);
    }
}
