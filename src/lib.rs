//! svcproxy: an embeddable L4 service proxy, a Kubernetes Service done as a library.
//!
//! Build a [`Table`] of services and endpoints, start a [`Proxy`] on it, and change the table
//! while the proxy runs: new connections follow each published change at once.
//!
//! ```
//! use std::io::{Read, Write};
//! use std::net::{TcpListener, TcpStream};
//! use std::sync::Arc;
//! use std::time::Duration;
//! use svcproxy::{Batch, Endpoint, Options, Proxy, Service, ServicePort, Table};
//!
//! // A backend that answers "hello".
//! let backend = TcpListener::bind("127.0.0.1:0")?;
//! let endpoint = backend.local_addr()?;
//! std::thread::spawn(move || {
//!     for mut s in backend.incoming().flatten() {
//!         let _ = s.write_all(b"hello");
//!     }
//! });
//!
//! // A service on 127.0.0.1:18080 in front of it.
//! let table = Arc::new(Table::default());
//! let web = Service::new("default/web")
//!     .address("127.0.0.1".parse()?)
//!     .port(ServicePort::tcp(18080));
//! table.apply(Batch::new().upsert(web).replace_endpoints("default/web", vec![Endpoint::new(endpoint)]))?;
//!
//! let proxy = Proxy::start(table.clone(), Options::default())?;
//! let mut client = TcpStream::connect("127.0.0.1:18080")?;
//! let mut reply = String::new();
//! client.read_to_string(&mut reply)?;
//! assert_eq!(reply, "hello");
//! assert_eq!(proxy.stats()[0].totals.bytes_out, 5);
//! drop(client);
//! proxy.shutdown(Duration::from_secs(1))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod proxy;

pub use proxy::{BackendKind, DISABLE_IO_URING, Error, Options, Proxy, io_uring_available};
pub use svcproxy_core as core;
pub use svcproxy_core::{
    Batch, Change, Conditions, CounterValues, DescriptorBudget, DrainPolicy, Endpoint, Forwarding,
    IoUringConfig, Policy, PortStats, Protocol, ProxyConfig, Service, ServicePort, ServicePortKey,
    SessionAffinity, Snapshot, Table, TableConfig, TableError, TargetPort, TcpPolicy,
    TrafficPolicy, WorkerHealth,
};
pub use svcproxy_socklb as socket_lb;
pub use svcproxy_sys::limits::raise_descriptor_limit;
