//! The ring, and every piece of memory the kernel reads or writes on its behalf. All of this
//! backend's `unsafe` lives here.
//!
//! Contract: the rest of the backend submits operations through safe methods that take plain
//! values (descriptors, addresses, buffer ids). Whatever memory an operation needs (a socket
//! address, a timespec, a `msghdr`, the eventfd's 8 bytes) is owned by the [`Ring`] until the
//! operation's final completion, keyed by its user data; provided buffers live in mmap'd memory
//! owned by a [`BufRing`] for the ring's whole life and are handed out only between the
//! completion that filled them and [`BufRing::recycle`]. So no pointer given to the kernel can
//! dangle, and no Rust reference aliases memory the kernel may be writing.
//!
//! User data must be unique among the operations in flight that own memory.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::types::{CancelBuilder, Fd, SubmitArgs, Timespec};
use io_uring::{IoUring, Probe, cqueue, opcode, squeue};
use svcproxy_sys::ancillary::{ControlBuf, NameBuf, write_pktinfo, write_sockaddr};

/// Why io_uring cannot be used here.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Opcodes the backend needs.
const NEEDED: [(u8, &str); 10] = [
    (opcode::PollAdd::CODE, "poll"),
    (opcode::AcceptMulti::CODE, "accept"),
    (opcode::Connect::CODE, "connect"),
    (opcode::Recv::CODE, "recv"),
    (opcode::Send::CODE, "send"),
    (opcode::RecvMsg::CODE, "recvmsg"),
    (opcode::SendMsg::CODE, "sendmsg"),
    (opcode::Splice::CODE, "splice"),
    (opcode::AsyncCancel2::CODE, "async cancel"),
    (opcode::Read::CODE, "read"),
];

/// Whether this kernel and process may use io_uring with what the backend needs: a ring can be
/// set up (not disabled by `kernel.io_uring_disabled`, seccomp or an old kernel), waits can
/// have a timeout, every opcode is supported, and provided-buffer rings can be registered.
///
/// The test ring lives on a thread of its own: tearing a ring down queues work for the task that
/// created it, which would interrupt a blocking call of the caller's (EINTR on a socket with a
/// timeout).
pub fn probe() -> Result<(), Unavailable> {
    std::thread::scope(|s| {
        s.spawn(probe_here)
            .join()
            .unwrap_or_else(|_| Err(Unavailable("the io_uring probe panicked".into())))
    })
}

fn probe_here() -> Result<(), Unavailable> {
    let ring = IoUring::new(8).map_err(|e| {
        let why = match e.raw_os_error() {
            Some(libc::ENOSYS) => "the kernel has no io_uring or a seccomp filter blocks it",
            Some(libc::EPERM) => {
                "io_uring is disabled (sysctl kernel.io_uring_disabled) or not permitted"
            }
            _ => "io_uring_setup failed",
        };
        Unavailable(format!("{why}: {e}"))
    })?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| Unavailable(format!("cannot probe io_uring opcodes: {e}")))?;
    if !ring.params().is_feature_ext_arg() {
        return Err(Unavailable(
            "the kernel's io_uring cannot wait with a timeout (IORING_FEAT_EXT_ARG)".into(),
        ));
    }
    if let Some((_, name)) = NEEDED.iter().find(|(code, _)| !probe.is_supported(*code)) {
        return Err(Unavailable(format!(
            "the kernel's io_uring lacks the {name} operation"
        )));
    }
    let buffers = BufRing::new(&ring, 0, 8, 4096)
        .map_err(|e| Unavailable(format!("cannot register a provided-buffer ring: {e}")))?;
    buffers.unregister(&ring);
    Ok(())
}

/// Memory an operation in flight owns; only kept alive, never read again by us.
type OpMemory = Box<dyn std::any::Any>;

struct SendMsgMemory {
    header: libc::msghdr,
    iov: libc::iovec,
    name: NameBuf,
    control: ControlBuf,
}

/// One completion.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Completion {
    pub(crate) user_data: u64,
    pub(crate) result: i32,
    pub(crate) flags: u32,
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
}

/// A worker's io_uring.
pub(crate) struct Ring {
    ring: IoUring,
    /// Memory of operations in flight, by user data.
    memory: HashMap<u64, OpMemory>,
}

/// Settings of one ring.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RingOptions {
    pub(crate) entries: u32,
    pub(crate) sqpoll: bool,
}

impl Ring {
    /// Sets up a ring for the calling thread: single issuer, deferred task running (fewer
    /// interruptions of the worker), falling back to plain setup on kernels without them; or
    /// with a submission-polling kernel thread when `sqpoll`.
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
        let mut last = None;
        for attempt in attempts {
            match attempt() {
                Ok(ring) => {
                    return Ok(Self {
                        ring,
                        memory: HashMap::new(),
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("io_uring setup failed")))
    }

    /// The underlying ring (for registering buffer rings).
    pub(crate) fn raw(&self) -> &IoUring {
        &self.ring
    }

    /// Queues `entries` together (all or none), submitting first while the submission queue
    /// lacks room for them. Together matters for a linked chain: if the kernel (or its
    /// submission-polling thread) took the head without the rest, it would end the chain there.
    ///
    /// # Safety
    /// Every pointer in `entries` must stay valid until its operation's final completion.
    unsafe fn push(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        loop {
            // SAFETY: passed on from the caller.
            if unsafe { self.ring.submission().push_multiple(entries) }.is_ok() {
                return Ok(());
            }
            self.submit()?;
        }
    }

    /// Queues an operation whose memory lives in `memory` until its final completion.
    fn push_owning(
        &mut self,
        entry: squeue::Entry,
        user_data: u64,
        memory: OpMemory,
    ) -> io::Result<()> {
        // Boxed memory does not move when the map rehashes.
        self.memory.insert(user_data, memory);
        // SAFETY: every pointer in `entry` points into `memory`, now owned by `self.memory`
        // until `complete` sees the final completion for `user_data`.
        unsafe { self.push(&[entry.user_data(user_data)]) }
    }

    /// Queues an operation that references no memory of ours.
    fn push_plain(&mut self, entry: squeue::Entry, user_data: u64) -> io::Result<()> {
        // SAFETY: the entry carries descriptors and numbers only, or pointers into buffer rings
        // that outlive the ring (see `send_buffer`).
        unsafe { self.push(&[entry.user_data(user_data)]) }
    }

    /// Submits what is queued without waiting.
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) =>
                {
                    if e.raw_os_error() == Some(libc::EBUSY) {
                        return Ok(());
                    }
                }
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

    /// Moves the available completions into `out`, releasing the memory of finished operations.
    pub(crate) fn completions(&mut self, out: &mut Vec<Completion>) {
        out.clear();
        for cqe in self.ring.completion() {
            let c = Completion {
                user_data: cqe.user_data(),
                result: cqe.result(),
                flags: cqe.flags(),
            };
            if !c.more() && !self.memory.is_empty() {
                self.memory.remove(&c.user_data);
            }
            out.push(c);
        }
    }

    /// A multishot accept.
    pub(crate) fn accept(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let entry = opcode::AcceptMulti::new(Fd(fd))
            .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            .build();
        self.push_plain(entry, user_data)
    }

    /// A connect; its deadline is the engine's (the caller cancels it when it passes).
    pub(crate) fn connect(&mut self, fd: RawFd, to: SocketAddr, user_data: u64) -> io::Result<()> {
        let mut memory = Box::new(NameBuf::default());
        let len = write_sockaddr(to, &mut memory);
        let addr = memory.0.as_ptr().cast::<libc::sockaddr>();
        let entry = opcode::Connect::new(Fd(fd), addr, len as libc::socklen_t).build();
        self.push_owning(entry, user_data, memory)
    }

    /// A receive into a buffer of `group`.
    pub(crate) fn recv(&mut self, fd: RawFd, group: u16, user_data: u64) -> io::Result<()> {
        let entry = opcode::Recv::new(Fd(fd), std::ptr::null_mut(), 0)
            .buf_group(group)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT);
        self.push_plain(entry, user_data)
    }

    /// A multishot receive into buffers of `group`.
    pub(crate) fn recv_multi(&mut self, fd: RawFd, group: u16, user_data: u64) -> io::Result<()> {
        self.push_plain(opcode::RecvMulti::new(Fd(fd), group).build(), user_data)
    }

    /// Sends `len` bytes of buffer `bid` of `buffers` from `offset`, all of them or fail.
    pub(crate) fn send_buffer(
        &mut self,
        fd: RawFd,
        buffers: &BufRing,
        bid: u16,
        offset: usize,
        len: usize,
        user_data: u64,
    ) -> io::Result<()> {
        let ptr = buffers.pointer(bid, offset);
        let entry = opcode::Send::new(Fd(fd), ptr, len as u32)
            .flags(libc::MSG_WAITALL | libc::MSG_NOSIGNAL)
            .build();
        self.push_plain(entry, user_data)
    }

    /// A multishot `recvmsg` into buffers of `group`, reporting peer and local address.
    pub(crate) fn recvmsg_multi(
        &mut self,
        fd: RawFd,
        group: u16,
        user_data: u64,
    ) -> io::Result<()> {
        // SAFETY: all zeroes is a valid msghdr; the kernel reads only the two lengths.
        let mut header: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        header.msg_namelen = RECVMSG_NAME as libc::socklen_t;
        header.msg_controllen = RECVMSG_CONTROL;
        let entry = opcode::RecvMsgMulti::new(Fd(fd), &*header, group).build();
        self.push_owning(entry, user_data, header)
    }

    /// Sends `payload` (bytes of a provided buffer) to `to` from local address `from`.
    pub(crate) fn sendmsg(
        &mut self,
        fd: RawFd,
        payload: (*const u8, usize),
        to: SocketAddr,
        from: IpAddr,
        user_data: u64,
    ) -> io::Result<()> {
        // SAFETY: all zeroes is a valid msghdr and iovec; every field used is set below.
        let mut m: Box<SendMsgMemory> = Box::new(unsafe { std::mem::zeroed() });
        let name_len = write_sockaddr(to, &mut m.name);
        let control_len = write_pktinfo(from, &mut m.control);
        m.iov = libc::iovec {
            iov_base: payload.0 as *mut libc::c_void,
            iov_len: payload.1,
        };
        m.header.msg_name = m.name.0.as_mut_ptr().cast();
        m.header.msg_namelen = name_len as libc::socklen_t;
        m.header.msg_iov = &mut m.iov;
        m.header.msg_iovlen = 1;
        m.header.msg_control = m.control.0.as_mut_ptr().cast();
        m.header.msg_controllen = control_len;
        let entry = opcode::SendMsg::new(Fd(fd), &m.header)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build();
        self.push_owning(entry, user_data, m)
    }

    /// Sends `payload` (bytes of a provided buffer) on a connected socket.
    pub(crate) fn send_bytes(
        &mut self,
        fd: RawFd,
        payload: (*const u8, usize),
        user_data: u64,
    ) -> io::Result<()> {
        let entry = opcode::Send::new(Fd(fd), payload.0, payload.1 as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        self.push_plain(entry, user_data)
    }

    /// Moves up to `len` bytes from `from` to `to` (one of them a pipe), without waiting:
    /// `-EAGAIN` when a side is not ready.
    pub(crate) fn splice(
        &mut self,
        from: RawFd,
        to: RawFd,
        len: u32,
        user_data: u64,
    ) -> io::Result<()> {
        let entry = opcode::Splice::new(Fd(from), -1, Fd(to), -1, len)
            .flags(libc::SPLICE_F_NONBLOCK)
            .build();
        self.push_plain(entry, user_data)
    }

    /// Completes once `fd` is ready for `events` (`POLLIN`, `POLLOUT`).
    pub(crate) fn poll(&mut self, fd: RawFd, events: u32, user_data: u64) -> io::Result<()> {
        self.push_plain(opcode::PollAdd::new(Fd(fd), events).build(), user_data)
    }

    /// Cancels every operation on `fd`; the cancel itself completes only on failure.
    pub(crate) fn cancel_fd(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let entry = opcode::AsyncCancel2::new(CancelBuilder::fd(Fd(fd)).all())
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS);
        self.push_plain(entry, user_data)
    }

    /// Reads the 8-byte counter of an eventfd (to be woken from other threads).
    pub(crate) fn read_eventfd(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let mut buf = Box::new([0u8; 8]);
        let entry = opcode::Read::new(Fd(fd), buf.as_mut_ptr(), 8).build();
        self.push_owning(entry, user_data, buf)
    }
}

/// An all-zero `msghdr` (null pointers, zero lengths).
pub(crate) fn zeroed_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is a plain C struct for which all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Takes ownership of a descriptor an accept completion returned.
pub(crate) fn accepted(fd: i32) -> socket2::Socket {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: a non-negative accept result is a new descriptor the kernel opened for this
    // process; nothing else owns it.
    socket2::Socket::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Room for the peer address in a multishot `recvmsg` buffer.
pub(crate) const RECVMSG_NAME: usize = std::mem::size_of::<libc::sockaddr_in6>();
/// Room for the pktinfo control message in a multishot `recvmsg` buffer.
pub(crate) const RECVMSG_CONTROL: usize = 64;

/// A provided-buffer ring: `count` buffers of `size` bytes the kernel picks from.
pub(crate) struct BufRing {
    group: u16,
    count: u16,
    size: usize,
    ring: NonNull<io_uring::types::BufRingEntry>,
    ring_len: usize,
    data: NonNull<u8>,
    data_len: usize,
    tail: u16,
}

fn map(len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: an anonymous private mapping with no address hint; the result is checked.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))
}

impl BufRing {
    /// Registers group `group` with `count` (a power of two) buffers of `size` bytes, all given
    /// to the kernel.
    pub(crate) fn new(ring: &IoUring, group: u16, count: u16, size: usize) -> io::Result<Self> {
        let ring_len = usize::from(count) * std::mem::size_of::<io_uring::types::BufRingEntry>();
        let data_len = usize::from(count) * size;
        let ring_mem: NonNull<io_uring::types::BufRingEntry> = map(ring_len)?.cast();
        let data = match map(data_len) {
            Ok(d) => d,
            Err(e) => {
                // SAFETY: unmapping exactly what was mapped above, not used since.
                unsafe { libc::munmap(ring_mem.as_ptr().cast(), ring_len) };
                return Err(e);
            }
        };
        let mut this = Self {
            group,
            count,
            size,
            ring: ring_mem,
            ring_len,
            data,
            data_len,
            tail: 0,
        };
        // SAFETY: the ring memory is mapped for `count` entries and stays mapped until `Drop`,
        // which the ring outlives only after unregistering (see `unregister` and the worker).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                this.ring.as_ptr() as u64,
                count,
                group,
                0,
            )?;
        }
        for bid in 0..count {
            this.push(bid);
        }
        this.publish();
        Ok(this)
    }

    /// The buffer group id.
    pub(crate) fn group(&self) -> u16 {
        self.group
    }

    fn push(&mut self, bid: u16) {
        let mask = self.count - 1;
        let index = usize::from(self.tail & mask);
        // SAFETY: `index < count`, inside the mapped ring; the kernel does not read entries
        // beyond the published tail, and this one is not published yet.
        let entry = unsafe { &mut *self.ring.as_ptr().add(index) };
        entry.set_addr(self.pointer(bid, 0) as u64);
        entry.set_len(self.size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail lives in the first entry's reserved field, inside the mapping; the
        // kernel reads it with acquire semantics, so a release store publishes the entries.
        unsafe {
            let tail = io_uring::types::BufRingEntry::tail(self.ring.as_ptr()) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// Gives buffer `bid` back to the kernel. Its bytes must not be used afterwards.
    pub(crate) fn recycle(&mut self, bid: u16) {
        self.push(bid);
        self.publish();
    }

    fn pointer(&self, bid: u16, offset: usize) -> *const u8 {
        debug_assert!(bid < self.count && offset <= self.size);
        // SAFETY: inside the data mapping (bid < count, offset ≤ size).
        unsafe {
            self.data
                .as_ptr()
                .add(usize::from(bid) * self.size + offset)
        }
    }

    /// The first `len` bytes of buffer `bid`, which a completion has just filled and which is
    /// not recycled yet.
    pub(crate) fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        let len = len.min(self.size);
        // SAFETY: the buffer is ours between its completion and `recycle` (the kernel picks
        // only published buffers), so nothing writes it while this borrow of `self` lives.
        unsafe { std::slice::from_raw_parts(self.pointer(bid, 0), len) }
    }

    /// Pointer and length of `len` bytes of buffer `bid` from `offset`, for a send.
    pub(crate) fn span(&self, bid: u16, offset: usize, len: usize) -> (*const u8, usize) {
        (self.pointer(bid, offset), len.min(self.size - offset))
    }

    /// Unregisters the group (before the ring goes away or the memory is unmapped).
    pub(crate) fn unregister(&self, ring: &IoUring) {
        let _ = ring.submitter().unregister_buf_ring(self.group);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the group was unregistered or its ring destroyed before (the worker drops the
        // ring first), so the kernel no longer touches either mapping.
        unsafe {
            libc::munmap(self.ring.as_ptr().cast(), self.ring_len);
            libc::munmap(self.data.as_ptr().cast(), self.data_len);
        }
    }
}
