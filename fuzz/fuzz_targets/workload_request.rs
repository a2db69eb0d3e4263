//! Fuzz target: see `tessera::fuzzing::workload_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera::fuzzing::workload_request(data));
