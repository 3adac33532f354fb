//! io_uring user data: what a completion is about. The top 4 bits say which operation, the low
//! 60 bits name its object (a listener, connection, flow or UDP send) by generation-checked
//! [`SlotId`], so a completion for something since closed and replaced is recognised.

use svcproxy_core::SlotId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// The waker eventfd was written.
    Wake = 1,
    /// Multishot accept on a TCP listener.
    Accept = 2,
    /// A connection's connect.
    Connect = 3,
    /// Receive from the client (splice forwarding: the client is readable).
    RecvUp = 4,
    /// Receive from the backend (splice forwarding: the backend is readable).
    RecvDown = 5,
    /// Send to the backend (or the backend is writable).
    SendUp = 6,
    /// Send to the client (or the client is writable).
    SendDown = 7,
    /// Multishot recvmsg on a UDP listener.
    ListenerRecv = 8,
    /// Multishot receive on a UDP flow's socket.
    FlowRecv = 9,
    /// A datagram sent to an endpoint or back to a client.
    UdpSend = 10,
    /// The timeout armed for the engine's next deadline; the id is its sequence number.
    Deadline = 11,
}

pub(crate) fn user_data(op: Op, id: SlotId) -> u64 {
    ((op as u64) << 60) | id.to_u64()
}

pub(crate) fn op(user_data: u64) -> Option<Op> {
    Some(match user_data >> 60 {
        1 => Op::Wake,
        2 => Op::Accept,
        3 => Op::Connect,
        4 => Op::RecvUp,
        5 => Op::RecvDown,
        6 => Op::SendUp,
        7 => Op::SendDown,
        8 => Op::ListenerRecv,
        9 => Op::FlowRecv,
        10 => Op::UdpSend,
        11 => Op::Deadline,
        _ => return None,
    })
}

pub(crate) fn id(user_data: u64) -> SlotId {
    SlotId::from_u64(user_data)
}
