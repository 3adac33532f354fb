//! The boundary itself: reading C pointers and strings, writing results and error text, and
//! keeping panics from unwinding into C. Every `unsafe` of the crate that dereferences a
//! caller's pointer is here, each behind a null check.

use std::ffi::{CStr, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Result codes. Numbers are stable: new codes are only ever added.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum svcproxy_result {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    Null = 1,
    /// An argument or option is out of range or malformed (the message names it).
    Invalid = 2,
    /// The change names a service that does not exist.
    UnknownService = 3,
    /// Two services claim the same address, port and protocol.
    Conflict = 4,
    /// The JSON document could not be parsed.
    Json = 5,
    /// The proxy could not start (resources, io_uring unavailable when asked for).
    Start = 6,
    /// The call does not fit the proxy's state (start twice, shutdown before start).
    State = 7,
    /// The caller's buffer is too small; the needed size or count was written.
    Buffer = 8,
    /// An internal error (a bug); the proxy may be unusable.
    Panic = 9,
    /// Waiting for the workers timed out.
    Timeout = 10,
}

/// An error: its code and text.
pub(crate) struct Failure(pub(crate) svcproxy_result, pub(crate) String);

impl Failure {
    pub(crate) fn new(code: svcproxy_result, text: impl Into<String>) -> Self {
        Self(code, text.into())
    }
}

pub(crate) type Outcome = Result<(), Failure>;

/// Writes `text` into the caller's buffer `err` of `len` bytes (NUL-terminated, truncated at a
/// character boundary). Does nothing when `err` is NULL or `len` is 0.
pub(crate) fn write_text(err: *mut c_char, len: usize, text: &str) {
    if err.is_null() || len == 0 {
        return;
    }
    let mut n = text.len().min(len - 1);
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    // SAFETY: the caller promises `err` points to `len` writable bytes; we write `n + 1 ≤ len`.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), err.cast::<u8>(), n);
        *err.add(n) = 0;
    }
}

/// Runs `body`, catching panics, and reports its outcome: the code, with the text written
/// into `err` (emptied on success).
pub(crate) fn guard(
    err: *mut c_char,
    len: usize,
    body: impl FnOnce() -> Outcome,
) -> svcproxy_result {
    let outcome = catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(Failure::new(
            svcproxy_result::Panic,
            format!("internal error: {what}"),
        ))
    });
    match outcome {
        Ok(()) => {
            write_text(err, len, "");
            svcproxy_result::Ok
        }
        Err(Failure(code, text)) => {
            write_text(err, len, &text);
            code
        }
    }
}

/// The object behind a handle the caller passed, or a `Null` failure naming the argument.
pub(crate) fn object<'a, T>(ptr: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: non-null handles and structs come from the caller, who promises they are valid
    // (handles: returned by this library and not freed) for the duration of the call.
    unsafe { ptr.as_ref() }
        .ok_or_else(|| Failure::new(svcproxy_result::Null, format!("{what} is NULL")))
}

/// A required NUL-terminated UTF-8 string argument.
pub(crate) fn text<'a>(ptr: *const c_char, what: &str) -> Result<&'a str, Failure> {
    optional_text(ptr, what)?
        .ok_or_else(|| Failure::new(svcproxy_result::Null, format!("{what} is NULL")))
}

/// An optional (NULL allowed) NUL-terminated UTF-8 string argument.
pub(crate) fn optional_text<'a>(
    ptr: *const c_char,
    what: &str,
) -> Result<Option<&'a str>, Failure> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null, and the caller promises a NUL-terminated string valid for the call.
    let s = unsafe { CStr::from_ptr(ptr) };
    s.to_str()
        .map(Some)
        .map_err(|_| Failure::new(svcproxy_result::Invalid, format!("{what} is not UTF-8")))
}

/// An array argument of `len` items (`ptr` may be NULL only when `len` is 0).
pub(crate) fn array<'a, T>(ptr: *const T, len: usize, what: &str) -> Result<&'a [T], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(Failure::new(
            svcproxy_result::Null,
            format!("{what} is NULL but its length is {len}"),
        ));
    }
    // SAFETY: non-null, and the caller promises `len` valid, initialised items for the call.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// An output slot the caller passed.
pub(crate) fn slot<'a, T>(ptr: *mut T, what: &str) -> Result<&'a mut T, Failure> {
    // SAFETY: non-null out-pointers come from the caller, who promises they are valid and
    // writable for the duration of the call.
    unsafe { ptr.as_mut() }
        .ok_or_else(|| Failure::new(svcproxy_result::Null, format!("{what} is NULL")))
}

/// Writes `value` to an optional output slot.
pub(crate) fn maybe_write<T>(ptr: *mut T, value: T) {
    // SAFETY: as for `slot`; NULL means the caller does not want the value.
    if let Some(slot) = unsafe { ptr.as_mut() } {
        *slot = value;
    }
}

/// An output array of `capacity` items.
pub(crate) fn out_array<'a, T>(
    ptr: *mut T,
    capacity: usize,
    what: &str,
) -> Result<&'a mut [T], Failure> {
    if capacity == 0 {
        return Ok(&mut []);
    }
    if ptr.is_null() {
        return Err(Failure::new(
            svcproxy_result::Null,
            format!("{what} is NULL but its capacity is {capacity}"),
        ));
    }
    // SAFETY: non-null, and the caller promises `capacity` writable items for the call.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, capacity) })
}

/// Copies `s` into a fixed C string field (NUL-terminated, truncated).
pub(crate) fn fill<const N: usize>(field: &mut [c_char; N], s: &str) {
    let n = s.len().min(N - 1);
    for (d, b) in field.iter_mut().zip(s.as_bytes()[..n].iter()) {
        *d = *b as c_char;
    }
    field[n] = 0;
}

/// Moves a value to the heap and hands its pointer to the caller (who frees it with the
/// matching `_free`).
pub(crate) fn into_handle<T>(value: T) -> *mut T {
    Box::into_raw(Box::new(value))
}

/// Takes back a handle created by [`into_handle`] (NULL: nothing), for its `_free`.
pub(crate) fn from_handle<T>(ptr: *mut T) -> Option<Box<T>> {
    // SAFETY: `_free` functions document that their argument must be a handle returned by the
    // matching `_new` and not freed before, or NULL; such a pointer is a live `Box<T>`.
    (!ptr.is_null()).then(|| unsafe { Box::from_raw(ptr) })
}
