//! Descriptors passed between processes: a Unix `SOCK_SEQPACKET` socket, whose messages keep
//! their boundaries and carry descriptors (`SCM_RIGHTS`).
//!
//! Contract: one [`Channel::send`] is one message, bytes (at most [`MAX_MESSAGE`]) and up to
//! [`MAX_FDS`] descriptors; one [`Channel::recv`] returns exactly one message, its
//! descriptors owned and close-on-exec. A message cut short (more bytes or descriptors than
//! the buffers hold) is an error, never a silent loss; the end of the peer's messages is
//! `UnexpectedEof`. A [`ChannelListener`] accepts only peers running as the same user (checked
//! with `SO_PEERCRED`), and its socket file is readable and writable by that user only.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
    sockopt,
};

/// Descriptors one message may carry (the kernel's `SCM_MAX_FD` is 253).
pub const MAX_FDS: usize = 250;
/// Bytes one message may carry.
pub const MAX_MESSAGE: usize = 256 << 10;

/// A listening channel socket at a path.
#[derive(Debug)]
pub struct ChannelListener {
    fd: OwnedFd,
    path: PathBuf,
}

impl ChannelListener {
    /// Listens at `path` (which must not exist), non-blocking, mode 0600.
    pub fn bind(path: &Path) -> io::Result<Self> {
        let fd = seqpacket(SocketFlags::NONBLOCK)?;
        rustix::net::bind(&fd, &SocketAddrUnix::new(path)?)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        rustix::net::listen(&fd, 8)?;
        Ok(Self {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A peer that connected, if one is waiting (`None` when none is). A peer running as
    /// another user is refused (closed) and `None` returned.
    pub fn accept(&self) -> io::Result<Option<Channel>> {
        let fd = match rustix::net::accept_with(&self.fd, SocketFlags::CLOEXEC) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::AGAIN) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if peer_credentials(&fd)?.uid != rustix::process::geteuid().as_raw() {
            return Ok(None);
        }
        Ok(Some(Channel { fd }))
    }
}

/// One end of a connected channel (blocking).
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

/// The peer's credentials (`SO_PEERCRED`). Read into `libc::ucred`, whose pid may be 0 (a
/// peer in a process namespace this one does not see), which rustix's `UCred` (a non-zero
/// pid) cannot hold.
fn peer_credentials(fd: &OwnedFd) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a live `ucred` and `len` its size, both outliving the call; the
    // descriptor is borrowed from `fd` for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(fd),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cred)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn seqpacket(flags: SocketFlags) -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        flags | SocketFlags::CLOEXEC,
        None,
    )?)
}

impl Channel {
    /// Connects to the listener at `path`.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let fd = seqpacket(SocketFlags::empty())?;
        rustix::net::connect(&fd, &SocketAddrUnix::new(path)?)?;
        Ok(Self { fd })
    }

    /// The process id of the peer (as it was when it connected); `None` when the peer is in
    /// a process namespace this process does not see (the kernel reports 0).
    pub fn peer_pid(&self) -> io::Result<Option<u32>> {
        let pid = peer_credentials(&self.fd)?.pid;
        Ok(u32::try_from(pid).ok().filter(|&p| p != 0))
    }

    /// Makes each [`Channel::send`] and [`Channel::recv`] fail (`WouldBlock`) after
    /// `timeout` without progress.
    pub fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        sockopt::set_socket_timeout(&self.fd, sockopt::Timeout::Recv, Some(timeout))?;
        sockopt::set_socket_timeout(&self.fd, sockopt::Timeout::Send, Some(timeout))?;
        Ok(())
    }

    /// Sends one message: `bytes` and `fds` (duplicates travel; the caller keeps its own).
    pub fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if bytes.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a message of {} bytes and {} descriptors is over the limit",
                    bytes.len(),
                    fds.len()
                ),
            ));
        }
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::Error::other(
                "descriptors do not fit the control buffer",
            ));
        }
        let sent = rustix::net::sendmsg(
            &self.fd,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )?;
        if sent == bytes.len() {
            Ok(())
        } else {
            Err(io::Error::other("a message was sent in part"))
        }
    }

    /// Receives one message: its bytes and descriptors.
    pub fn recv(&self) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
        let mut bytes = vec![0u8; MAX_MESSAGE];
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            &self.fd,
            &mut [IoSliceMut::new(&mut bytes)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if got
            .flags
            .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a message was larger than the buffers",
            ));
        }
        if got.bytes == 0 && fds.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the channel",
            ));
        }
        bytes.truncate(got.bytes);
        Ok((bytes, fds))
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "system calls")]
    fn a_message_carries_bytes_and_working_descriptors() {
        let dir = std::env::temp_dir().join(format!("svcproxy-fd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("channel.sock");
        let _ = std::fs::remove_file(&path);
        let listener = ChannelListener::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(listener.accept().unwrap().is_none());
        let client = Channel::connect(&path).unwrap();
        let server = listener.accept().unwrap().expect("a peer");
        server.set_timeout(Duration::from_secs(10)).unwrap();

        let (mut ours, theirs) = UnixStream::pair().unwrap();
        client.send(b"hello", &[theirs.as_fd()]).unwrap();
        drop(theirs);
        let (bytes, mut fds) = server.recv().unwrap();
        assert_eq!(bytes, b"hello");
        assert_eq!(fds.len(), 1);
        let mut passed = UnixStream::from(fds.pop().unwrap());
        passed.write_all(b"x").unwrap();
        let mut got = [0u8; 1];
        ours.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"x");

        drop(client);
        let end = server.recv().unwrap_err();
        assert_eq!(end.kind(), io::ErrorKind::UnexpectedEof);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    #[cfg_attr(miri, ignore = "system calls")]
    fn too_many_descriptors_are_refused_before_sending() {
        let (a, _b) = UnixStream::pair().unwrap();
        let fd = seqpacket(SocketFlags::empty()).unwrap();
        let channel = Channel { fd };
        let fds = vec![a.as_fd(); MAX_FDS + 1];
        let e = channel.send(b"", &fds).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
