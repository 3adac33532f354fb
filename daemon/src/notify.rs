//! systemd's readiness protocol (`sd_notify`), for a unit of `Type=notify`: svcproxyd says
//! when it serves (`READY=1`), and a process that took over from another says that it is the
//! service's main process now (`MAINPID=`), so that systemd follows it when the old one exits
//! (the unit needs `NotifyAccess=all`: the new process is not the one systemd started).
//! Outside systemd (`NOTIFY_SOCKET` unset) nothing is sent.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (`KEY=value` lines) to systemd, if it asked for notifications; whether it
/// did.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) => notify_at(&socket, state).map(|()| true),
        None => Ok(false),
    }
}

/// Sends `state` to the notification socket `socket` (a path, or `@name` in the abstract
/// namespace).
pub fn notify_at(socket: &OsStr, state: &str) -> io::Result<()> {
    let sender = UnixDatagram::unbound()?;
    let addr = match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(socket)?,
    };
    sender.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

/// What a process that has taken over tells systemd.
pub fn took_over() -> String {
    format!("MAINPID={}\nREADY=1", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_reaches_a_path_and_an_abstract_socket() {
        let path = std::env::temp_dir().join(format!("svcproxyd-notify-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let systemd = UnixDatagram::bind(&path).unwrap();
        notify_at(path.as_os_str(), &took_over()).unwrap();
        let mut buf = [0u8; 128];
        let n = systemd.recv(&mut buf).unwrap();
        let pid = std::process::id();
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            format!("MAINPID={pid}\nREADY=1")
        );
        std::fs::remove_file(&path).unwrap();

        let name = format!("svcproxyd-notify-{pid}");
        let abstract_addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let systemd = UnixDatagram::bind_addr(&abstract_addr).unwrap();
        notify_at(OsStr::new(&format!("@{name}")), "READY=1").unwrap();
        let n = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
