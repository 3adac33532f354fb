//! What a listener or flow socket has queued on the ring: its multishot operation (accept,
//! `recvmsg`, receive) and its sends. A socket the engine has closed waits in [`Closing`] until
//! both are done: a descriptor closed under a queued operation could be reused before the ring
//! submits it, and the operation would act on another socket.

use std::collections::HashMap;

use svcproxy_core::SlotId;

/// Operations queued on one socket.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct InFlight {
    /// The multishot operation is in flight.
    pub(crate) armed: bool,
    /// Sends queued.
    pub(crate) sends: u32,
}

impl InFlight {
    fn idle(&self) -> bool {
        !self.armed && self.sends == 0
    }
}

/// Sockets the engine has closed, waiting for their last operation.
pub(crate) struct Closing<T>(HashMap<SlotId, T>);

impl<T> Default for Closing<T> {
    fn default() -> Self {
        Self(HashMap::new())
    }
}

impl<T: AsMut<InFlight>> Closing<T> {
    /// Keeps `socket` until its last operation has ended; one with none is dropped now.
    pub(crate) fn hold(&mut self, id: SlotId, mut socket: T) {
        if !socket.as_mut().idle() {
            self.0.insert(id, socket);
        }
    }

    /// An operation of socket `id` ended: its multishot one when `multishot`, else a send.
    /// The socket goes with the last one.
    pub(crate) fn ended(&mut self, id: SlotId, multishot: bool) {
        let Some(socket) = self.0.get_mut(&id) else {
            return;
        };
        let ops = socket.as_mut();
        if multishot {
            ops.armed = false;
        } else {
            ops.sends = ops.sends.saturating_sub(1);
        }
        if ops.idle() {
            self.0.remove(&id);
        }
    }

    /// Whether every closed socket is gone.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether socket `id` is still held.
    #[cfg(test)]
    pub(crate) fn holds(&self, id: SlotId) -> bool {
        self.0.contains_key(&id)
    }
}
