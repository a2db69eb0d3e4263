//! Fuzz target: see `tessera::fuzzing::spiffe_id`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera::fuzzing::spiffe_id(data));
