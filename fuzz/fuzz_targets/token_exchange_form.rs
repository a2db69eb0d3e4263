//! Fuzz target: see `tessera::fuzzing::token_exchange_form`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tessera::fuzzing::token_exchange_form(data));
