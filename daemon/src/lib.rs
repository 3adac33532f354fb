//! svcproxyd's parts, as a library for its binary and its tests: the config and Kubernetes
//! manifest readers, the running daemon and its HTTP endpoints, cluster IP capture, metrics, the
//! status page and the demo. The program itself is `src/main.rs`.

#![forbid(unsafe_code)]

pub mod capture;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod health_check;
pub mod http;
pub mod metrics;
pub mod nesting;
pub mod netlink;
pub mod notify;
pub mod objects;
pub mod publish;
pub mod status;
pub mod upgrade;
pub mod watch;
