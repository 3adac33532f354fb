//! Provided-buffer rings: `count` buffers of `size` bytes in memory the ring owns, which the
//! kernel picks from for receives and gives back in completions. A buffer is the kernel's from
//! [`BufRing::recycle`] (or registration) until a completion hands it over, and the backend's
//! from then on; its bytes are read only in between.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::IoUring;

use super::Group;

/// Bytes of one provided buffer: `len` bytes of buffer `bid` of `group` from `offset`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    pub(crate) group: Group,
    pub(crate) bid: u16,
    pub(crate) offset: usize,
    pub(crate) len: usize,
}

/// A provided-buffer ring: `count` buffers of `size` bytes the kernel picks from.
pub(super) struct BufRing {
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
    pub(super) fn new(ring: &IoUring, group: u16, count: u16, size: usize) -> io::Result<Self> {
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
            count,
            size,
            ring: ring_mem,
            ring_len,
            data,
            data_len,
            tail: 0,
        };
        // SAFETY: the ring memory is mapped for `count` entries and stays mapped until `Drop`,
        // which comes after the ring that uses it is destroyed (see `Ring`'s field order).
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

    fn push(&mut self, bid: u16) {
        let mask = self.count - 1;
        let index = usize::from(self.tail & mask);
        // SAFETY: `index < count`, inside the mapped ring; the kernel does not read entries
        // beyond the published tail, and this one is not published yet.
        let entry = unsafe { &mut *self.ring.as_ptr().add(index) };
        entry.set_addr(self.start(bid) as u64);
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
    pub(super) fn recycle(&mut self, bid: u16) {
        self.push(bid);
        self.publish();
    }

    fn start(&self, bid: u16) -> *const u8 {
        let bid = bid.min(self.count - 1);
        // SAFETY: inside the data mapping (bid < count).
        unsafe { self.data.as_ptr().add(usize::from(bid) * self.size) }
    }

    /// Pointer and length of `span`, checked to lie inside one buffer of this ring.
    pub(super) fn pointer(&self, span: Span) -> io::Result<(*const u8, usize)> {
        if span.bid >= self.count || span.offset > self.size || span.len > self.size - span.offset {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "span outside the provided buffers",
            ));
        }
        // SAFETY: offset ≤ size, so the result stays inside buffer `bid`.
        Ok((unsafe { self.start(span.bid).add(span.offset) }, span.len))
    }

    /// The first `len` bytes of buffer `bid`, which a completion has just filled and which is
    /// not recycled yet.
    pub(super) fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        let len = len.min(self.size);
        // SAFETY: the buffer is ours between its completion and `recycle` (the kernel picks
        // only published buffers), so nothing writes it while this borrow of `self` lives;
        // `start` keeps inside the mapping and `len` inside the buffer.
        unsafe { std::slice::from_raw_parts(self.start(bid), len) }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the ring that registered the group was destroyed before (`Ring` drops its
        // `IoUring` first), so the kernel no longer touches either mapping.
        unsafe {
            libc::munmap(self.ring.as_ptr().cast(), self.ring_len);
            libc::munmap(self.data.as_ptr().cast(), self.data_len);
        }
    }
}
