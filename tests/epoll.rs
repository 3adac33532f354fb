//! The behaviour suite against the epoll backend.

mod behaviour;

suite!(svcproxy::BackendKind::Epoll, 101);
