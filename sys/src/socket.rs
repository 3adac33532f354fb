//! Sockets as a service proxy needs them.
//!
//! Listeners are non-blocking, close-on-exec, `SO_REUSEADDR` + `SO_REUSEPORT` (one listener
//! per worker, the kernel spreads clients), `IP_FREEBIND` (a service address may be bound before
//! it is assigned to an interface), IPv6 listeners are IPv6-only (so `0.0.0.0` and `::` can both
//! be bound), TCP listeners set `TCP_NODELAY` (inherited by accepted sockets: a proxy forwards
//! whatever arrives at once), and UDP listeners report each datagram's destination address
//! (`IP_PKTINFO` / `IPV6_RECVPKTINFO`) so replies can be sent from it. Transparent listeners
//! (see `svcproxy_core::steering`) set `IP_TRANSPARENT`, and UDP ones report each datagram's
//! original destination instead (`IP_RECVORIGDSTADDR` / `IPV6_RECVORIGDSTADDR`).

use std::io;
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};

use rustix::net::SocketFlags;
use socket2::{Domain, SockAddr, Socket, Type};
use svcproxy_core::{Protocol, ServicePortKey};

/// How listeners are set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenOptions {
    /// TCP accept queue length.
    pub backlog: i32,
    /// `SO_RCVBUF` for UDP listeners (the kernel caps it at `net.core.rmem_max`).
    pub udp_recv_buffer: usize,
}

impl Default for ListenOptions {
    fn default() -> Self {
        Self {
            backlog: 4096,
            udp_recv_buffer: 4 << 20,
        }
    }
}

fn domain(addr: &SocketAddr) -> Domain {
    if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

fn socket_type(protocol: Protocol) -> Type {
    match protocol {
        Protocol::Tcp => Type::STREAM,
        Protocol::Udp => Type::DGRAM,
    }
    .nonblocking()
    .cloexec()
}

/// Creates a bound (and for TCP, listening) socket for `key`; a `transparent` one (needs
/// CAP_NET_ADMIN) takes the clients steered to it by `tproxy` rules.
pub fn listen(
    key: ServicePortKey,
    options: &ListenOptions,
    transparent: bool,
) -> io::Result<Socket> {
    let addr = key.addr;
    let socket = Socket::new(domain(&addr), socket_type(key.protocol), None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
        socket.set_freebind_v6(true)?;
        if transparent {
            socket.set_ip_transparent_v6(true)?;
        }
    } else {
        socket.set_freebind_v4(true)?;
        if transparent {
            socket.set_ip_transparent_v4(true)?;
        }
    }
    match key.protocol {
        Protocol::Tcp => {
            socket.set_tcp_nodelay(true)?;
            socket.bind(&addr.into())?;
            socket.listen(options.backlog)?;
        }
        Protocol::Udp => {
            enable_destination(&socket, addr.is_ipv6(), transparent)?;
            // Best effort: a smaller buffer only means more drops under bursts.
            let _ = socket.set_recv_buffer_size(options.udp_recv_buffer);
            socket.bind(&addr.into())?;
        }
    }
    Ok(socket)
}

/// The socket for a listener of `key`: `inherited` (handed over by another process) adopted,
/// or else a new one made with [`listen`].
pub fn listen_or_adopt(
    key: ServicePortKey,
    options: &ListenOptions,
    transparent: bool,
    inherited: Option<std::os::fd::OwnedFd>,
) -> io::Result<Socket> {
    match inherited {
        Some(fd) => adopt_listener(fd, key),
        None => listen(key, options, transparent),
    }
}

/// Takes over a listening socket another process handed over for `key` (see
/// `svcproxy_core::handover`), after checking that it is one: bound to `key`'s address, of
/// its protocol's type, and (TCP) listening. Made non-blocking; its options are as the other
/// process set them (that process made it with [`listen`]).
pub fn adopt_listener(fd: std::os::fd::OwnedFd, key: ServicePortKey) -> io::Result<Socket> {
    let socket = Socket::from(fd);
    let wrong = |what: String| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("inherited socket for {key}: {what}"),
        )
    };
    let expected = match key.protocol {
        Protocol::Tcp => Type::STREAM,
        Protocol::Udp => Type::DGRAM,
    };
    if socket.r#type()? != expected {
        return Err(wrong("not of the protocol's socket type".into()));
    }
    let bound = local_addr(&socket)?;
    if bound != key.addr {
        return Err(wrong(format!("bound to {bound}")));
    }
    if key.protocol == Protocol::Tcp && !socket.is_listener()? {
        return Err(wrong("not listening".into()));
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Takes over a UDP flow's socket another process handed over, after checking that it is a
/// datagram socket connected to `endpoint`. Made non-blocking.
pub fn adopt_flow(fd: std::os::fd::OwnedFd, endpoint: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::from(fd);
    let peer = socket.peer_addr()?.as_socket();
    if socket.r#type()? != Type::DGRAM || peer != Some(endpoint) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("inherited flow socket: not a UDP socket connected to {endpoint}"),
        ));
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Makes each datagram report its destination: the local address (`IP_PKTINFO`), or for a
/// `transparent` socket the original destination, port included.
fn enable_destination(socket: &Socket, v6: bool, transparent: bool) -> io::Result<()> {
    let (level, name) = match (v6, transparent) {
        (true, false) => (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO),
        (false, false) => (libc::IPPROTO_IP, libc::IP_PKTINFO),
        (true, true) => (libc::IPPROTO_IPV6, libc::IPV6_RECVORIGDSTADDR),
        (false, true) => (libc::IPPROTO_IP, libc::IP_RECVORIGDSTADDR),
    };
    let on: libc::c_int = 1;
    // SAFETY: `on` is a live c_int and the length passed is its size; the fd is owned by
    // `socket` for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Accepts one connection: non-blocking, close-on-exec. `WouldBlock` when none is waiting.
#[inline]
pub fn accept(listener: &Socket) -> io::Result<(Socket, SocketAddr)> {
    let (fd, peer) = rustix::net::acceptfrom_with(
        listener.as_fd(),
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
    )?;
    let peer = peer
        .and_then(|a| SocketAddr::try_from(a).ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "accepted peer is not an IP address",
            )
        })?;
    Ok((Socket::from(fd), peer))
}

/// The IP address and port `socket` is bound to (for a client accepted by a transparent
/// listener: the address it connected to).
pub fn local_addr(socket: &Socket) -> io::Result<SocketAddr> {
    socket.local_addr()?.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "local address is not an IP address",
        )
    })
}

/// A socket to reach `backend` with, optionally bound to `source` first (with
/// `IP_TRANSPARENT` when `transparent`, to present the client's address to the backend);
/// non-blocking unless `blocking`; TCP sockets set `TCP_NODELAY`.
pub fn outbound(
    backend: SocketAddr,
    protocol: Protocol,
    source: Option<SocketAddr>,
    transparent: bool,
    blocking: bool,
) -> io::Result<Socket> {
    let kind = socket_type(protocol);
    let kind = if blocking {
        match protocol {
            Protocol::Tcp => Type::STREAM.cloexec(),
            Protocol::Udp => Type::DGRAM.cloexec(),
        }
    } else {
        kind
    };
    let socket = Socket::new(domain(&backend), kind, None)?;
    if let Some(source) = source {
        if transparent {
            if source.is_ipv6() {
                socket.set_ip_transparent_v6(true)?;
            } else {
                socket.set_ip_transparent_v4(true)?;
            }
        }
        socket.bind(&source.into())?;
    }
    if protocol == Protocol::Tcp {
        socket.set_tcp_nodelay(true)?;
    }
    Ok(socket)
}

/// Starts connecting a non-blocking [`outbound`] socket to `backend`. TCP: returns at once;
/// the connect completes when the socket turns writable (check `take_error`). UDP: the socket
/// is connected when this returns.
pub fn connect(
    backend: SocketAddr,
    protocol: Protocol,
    source: Option<SocketAddr>,
    transparent: bool,
) -> io::Result<Socket> {
    let socket = outbound(backend, protocol, source, transparent, false)?;
    match socket.connect(&SockAddr::from(backend)) {
        Ok(()) => Ok(socket),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket),
        Err(e) => Err(e),
    }
}

/// Closes `socket` with a reset (RST) instead of a FIN.
pub fn reset(socket: Socket) {
    let _ = socket.set_linger(Some(std::time::Duration::ZERO));
    drop(socket);
}

/// Whether an error means "out of descriptors" (EMFILE, ENFILE) or of kernel memory for
/// sockets (ENOBUFS, ENOMEM): the kind to back off from rather than fail on.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Sorts an error of opening or connecting a socket for the connection engine: lack of
/// descriptors or socket memory ([`is_resource_exhaustion`]) makes the client wait, anything
/// else moves to the next endpoint.
pub fn open_error(e: io::Error) -> svcproxy_core::OpenError {
    if is_resource_exhaustion(&e) {
        svcproxy_core::OpenError::Exhausted(e)
    } else {
        svcproxy_core::OpenError::Failed(e)
    }
}
