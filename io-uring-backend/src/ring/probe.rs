//! Whether io_uring can be used here, with everything the backend needs.

use std::os::fd::AsFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram, UnixListener, UnixStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use io_uring::{IoUring, Probe, opcode};

use super::{Completion, Group, Ring, RingOptions};

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
    (opcode::AsyncCancel2::CODE, "async cancel"),
    (opcode::Read::CODE, "read"),
    (opcode::Timeout::CODE, "timeout"),
];

/// Whether this kernel and process may use io_uring with what the backend needs: a ring can be
/// set up (not disabled by `kernel.io_uring_disabled`, seccomp or an old kernel), waits can
/// have a timeout, every opcode is supported, provided-buffer rings can be registered, and the
/// multishot accept, receive and `recvmsg` work (the opcode probe cannot tell: a 5.19 kernel
/// has buffer rings and multishot accept but no multishot receive). Each multishot operation
/// is started on a socket of its own and cancelled; a kernel without it refuses it at once.
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
    drop(ring);
    let mut ring = Ring::new(RingOptions {
        entries: 8,
        sqpoll: false,
        tcp_buffers: (8, 4096),
        udp_buffers: (8, 4096),
    })
    .map_err(|e| Unavailable(format!("cannot register a provided-buffer ring: {e}")))?;
    multishot(&mut ring).map_err(|(name, e)| {
        Unavailable(format!("the kernel's io_uring lacks multishot {name}: {e}"))
    })
}

/// Starts each multishot operation the backend uses and cancels it.
fn multishot(ring: &mut Ring) -> Result<(), (&'static str, std::io::Error)> {
    static PROBES: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "svcproxy-probe-{}-{}",
        std::process::id(),
        PROBES.fetch_add(1, Ordering::Relaxed)
    );
    let setup = |e| ("operations (cannot set up a test socket)", e);
    let listener = UnixAddr::from_abstract_name(name.as_bytes())
        .and_then(|a| UnixListener::bind_addr(&a))
        .map_err(setup)?;
    let (stream, _peer) = UnixStream::pair().map_err(setup)?;
    let (datagram, _other) = UnixDatagram::pair().map_err(setup)?;
    let tests: [(&str, std::os::fd::BorrowedFd<'_>); 3] = [
        ("accept", listener.as_fd()),
        ("receive", stream.as_fd()),
        ("recvmsg", datagram.as_fd()),
    ];
    let queued = [
        ring.accept(tests[0].1, true, 0),
        ring.recv_multi(tests[1].1, Group::Tcp, 1),
        ring.recvmsg_multi(tests[2].1, Group::Udp, 2),
    ];
    for ((name, _), queued) in tests.iter().zip(queued) {
        queued.map_err(|e| (*name, e))?;
    }
    for (_, fd) in &tests {
        ring.cancel_fd(*fd).map_err(|e| ("cancel", e))?;
    }
    let mut ended = [None; 3];
    let mut completions: Vec<Completion> = Vec::new();
    for _ in 0..50 {
        if ended.iter().all(Option::is_some) {
            break;
        }
        ring.submit_and_wait(Some(Duration::from_millis(20)))
            .map_err(|e| ("operations (wait failed)", e))?;
        ring.completions(&mut completions);
        for c in completions.iter().filter(|c| !c.more()) {
            if let Some(slot) = ended.get_mut(c.tag as usize) {
                *slot = Some(c.result);
            }
        }
    }
    for ((name, _), result) in tests.iter().zip(ended) {
        match result {
            Some(r) if r == -libc::EINVAL || r == -libc::EOPNOTSUPP => {
                return Err((*name, std::io::Error::from_raw_os_error(-r)));
            }
            Some(_) => {}
            None => {
                return Err((
                    *name,
                    std::io::Error::other("it never completed when cancelled"),
                ));
            }
        }
    }
    Ok(())
}
