//! svcproxy: an embeddable L4 service proxy, a Kubernetes Service done as a library.
//!
//! For now this facade re-exports the core (model, tables, selection, flows, counters) as
//! [`core`](crate::core); the proxy API arrives with the first backend.

pub use svcproxy_core as core;
