//! Fuzz target: see `tessera::fuzzing::http2_authority`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera::fuzzing::http2_authority(data));
