//! io_uring user data: what a completion is about. The top 4 bits say which operation, the low
//! 60 bits name its object (a listener, connection, flow or UDP send) by generation-checked
//! [`SlotId`], so a completion for something since closed and replaced is recognised.

use svcproxy_core::SlotId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// The waker eventfd was written.
    Wake = 1,
    /// The once-a-second tick.
    Tick = 2,
    /// A one-off timer; the id says which ([`Timer`]).
    Timer = 3,
    /// Multishot accept on a TCP listener.
    Accept = 4,
    /// A connection's connect.
    Connect = 5,
    /// The deadline linked to a connect.
    ConnectTimeout = 6,
    /// Receive (or splice in) from the client.
    RecvUp = 7,
    /// Receive (or splice in) from the backend.
    RecvDown = 8,
    /// Send (or splice out) to the backend.
    SendUp = 9,
    /// Send (or splice out) to the client.
    SendDown = 10,
    /// Multishot recvmsg on a UDP listener.
    ListenerRecv = 11,
    /// Multishot receive on a UDP flow's socket.
    FlowRecv = 12,
    /// A datagram sent to an endpoint or back to a client.
    UdpSend = 13,
    /// A completion to ignore (a failed cancel).
    Ignore = 14,
}

/// One-off timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// Shutdown's deadline.
    Shutdown = 0,
    /// Accepting paused for lack of descriptors may resume.
    AcceptResume = 1,
}

pub(crate) fn user_data(op: Op, id: SlotId) -> u64 {
    ((op as u64) << 60) | id.to_u64()
}

pub(crate) fn timer(timer: Timer) -> u64 {
    ((Op::Timer as u64) << 60) | timer as u64
}

pub(crate) fn op(user_data: u64) -> Option<Op> {
    Some(match user_data >> 60 {
        1 => Op::Wake,
        2 => Op::Tick,
        3 => Op::Timer,
        4 => Op::Accept,
        5 => Op::Connect,
        6 => Op::ConnectTimeout,
        7 => Op::RecvUp,
        8 => Op::RecvDown,
        9 => Op::SendUp,
        10 => Op::SendDown,
        11 => Op::ListenerRecv,
        12 => Op::FlowRecv,
        13 => Op::UdpSend,
        14 => Op::Ignore,
        _ => return None,
    })
}

pub(crate) fn id(user_data: u64) -> SlotId {
    SlotId::from_u64(user_data)
}

pub(crate) fn which_timer(user_data: u64) -> Option<Timer> {
    match user_data & 0xf {
        0 => Some(Timer::Shutdown),
        1 => Some(Timer::AcceptResume),
        _ => None,
    }
}
