//! Helpers shared by core's integration tests (each test binary uses some of them).

#![allow(dead_code)]

/// Property-test cases: `native` normally, a handful under Miri, which runs every case
/// hundreds of times slower and is there to find undefined behaviour, not rare inputs.
pub fn cases(native: u32) -> u32 {
    if cfg!(miri) { native.min(4) } else { native }
}

/// A table with `config`, publishing `service` with its `endpoints`.
pub fn published(
    config: svcproxy_core::TableConfig,
    service: svcproxy_core::Service,
    endpoints: Vec<svcproxy_core::Endpoint>,
) -> svcproxy_core::Table {
    let table = svcproxy_core::Table::new(config);
    let name = service.name.clone();
    let batch = svcproxy_core::Batch::new()
        .upsert(service)
        .replace_endpoints(name, endpoints);
    table.apply(batch).unwrap();
    table
}
