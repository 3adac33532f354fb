//! Helpers shared by core's integration tests.

/// Property-test cases: `native` normally, a handful under Miri, which runs every case
/// hundreds of times slower and is there to find undefined behaviour, not rare inputs.
pub fn cases(native: u32) -> u32 {
    if cfg!(miri) { native.min(4) } else { native }
}
