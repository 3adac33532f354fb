//! Fuzzes one admin API request with the checks shared with the proptest campaign.

#![no_main]

// Each target calls one of the shared checks.
#[allow(dead_code)]
#[path = "../../daemon/tests/fuzz_checks/mod.rs"]
mod fuzz_checks;

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    if let Err(why) = fuzz_checks::admin_api(input) {
        panic!("{why}");
    }
});
