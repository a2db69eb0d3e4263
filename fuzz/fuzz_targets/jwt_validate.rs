//! Fuzz target: see `tessera::fuzzing::jwt_validate`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tessera::fuzzing::jwt_validate(data);
});
