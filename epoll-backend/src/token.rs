//! epoll user data: what an event is about. The top 4 bits say what kind of thing, the low 60
//! bits are its generation-checked [`SlotId`], so events for closed things are ignored.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::event::epoll;
use svcproxy_core::SlotId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Waker = 1,
    TcpListener = 2,
    UdpListener = 3,
    Client = 4,
    Backend = 5,
    Flow = 6,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token(pub(crate) u64);

impl Token {
    pub(crate) fn new(kind: Kind, id: SlotId) -> Self {
        Token(((kind as u64) << 60) | id.to_u64())
    }

    pub(crate) const WAKER: Token = Token((Kind::Waker as u64) << 60);

    pub(crate) fn kind(self) -> Option<Kind> {
        Some(match self.0 >> 60 {
            1 => Kind::Waker,
            2 => Kind::TcpListener,
            3 => Kind::UdpListener,
            4 => Kind::Client,
            5 => Kind::Backend,
            6 => Kind::Flow,
            _ => return None,
        })
    }

    pub(crate) fn id(self) -> SlotId {
        SlotId::from_u64(self.0)
    }
}

/// Adds `fd` to `epoll`, its events tagged with `token`.
pub(crate) fn watch(
    epoll: &OwnedFd,
    fd: impl AsFd,
    token: Token,
    flags: epoll::EventFlags,
) -> io::Result<()> {
    Ok(epoll::add(
        epoll,
        fd,
        epoll::EventData::new_u64(token.0),
        flags,
    )?)
}
