pub use svcproxy_core as core;
