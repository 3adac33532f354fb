//! svcproxy's core: the model, lock-free service tables, endpoint selection, the UDP flow
//! table, counters, the connection budget and the connection engine that every data plane
//! drives ([`engine`]). No I/O: the backends do that.
//!
//! ```
//! use std::time::Instant;
//! use svcproxy_core::{Batch, Endpoint, Protocol, Service, ServicePort, ServicePortKey, Table};
//!
//! let table = Table::default();
//! let web = Service::new("default/web")
//!     .address("127.0.0.1".parse()?)
//!     .port(ServicePort::tcp(8080));
//! let endpoints = vec![
//!     Endpoint::new("127.0.0.1:9001".parse()?),
//!     Endpoint::new("127.0.0.1:9002".parse()?),
//! ];
//! table.apply(Batch::new().upsert(web).replace_endpoints("default/web", endpoints))?;
//!
//! let key = ServicePortKey::new("127.0.0.1:8080".parse()?, Protocol::Tcp);
//! let snapshot = table.load();
//! let port = snapshot.lookup(&key).expect("the service is published");
//! let client = "127.0.0.1:40000".parse()?;
//! let first = port.select(client, Instant::now()).unwrap().addr();
//! let second = port.select(client, Instant::now()).unwrap().addr();
//! assert_ne!(first, second); // round robin
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backoff;
pub mod budget;
pub mod clients;
pub mod config;
pub mod control;
pub mod descriptors;
pub mod engine;
pub mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod flow;
pub mod handover;
mod loom;
pub mod model;
#[cfg(feature = "serde")]
pub mod schema;
pub mod select;
pub mod session;
pub mod slots;
pub mod stats;
pub mod steering;
pub mod supervisor;
pub mod table;

pub use backoff::Backoff;
pub use budget::{Budget, Permit};
pub use config::{Forwarding, IoUringConfig, ProxyConfig};
pub use control::{Control, WorkerContext};
pub use descriptors::DescriptorBudget;
pub use engine::{Connection, Driver, Engine, Lifecycle, OpenError};
pub use error::{Problem, TableError, ValidationError};
pub use flow::{
    Destination, Flow, FlowId, FlowKey, FlowLimits, FlowTable, REPLY_GRACE, UNREPLIED_TIMEOUT,
};
pub use model::{
    Conditions, Endpoint, Family, FrontendKind, Hints, NamedPort, Policy, Protocol, Scope, Service,
    ServicePort, ServicePortKey, SessionAffinity, TargetPort, TrafficPolicy,
};
pub use select::{Backend, Locality, PortState, Route, Routed};
pub use session::{DrainPolicy, TcpPolicy, TcpSession};
pub use slots::{SlotId, Slots};
pub use stats::{CounterValues, Counters, Opened, PortStats, Tally};
pub use steering::Steering;
pub use supervisor::{WorkerHealth, supervise};
pub use table::{Batch, Change, Published, Snapshot, Table, TableConfig};
