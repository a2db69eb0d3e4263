//! Replays every input the fuzzers kept (`fuzz/corpus/<target>/`) and every crash they found
//! (`fuzz/regressions/<target>/`) through the same harnesses, on stable Rust, as part of
//! `cargo test`: a fixed bug stays fixed without running the fuzzers.

use std::path::Path;

fn replay(target: &str, harness: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries {
            let path = e.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let r = std::panic::catch_unwind(|| harness(&data));
            assert!(r.is_ok(), "{target}: {} panics", path.display());
            n += 1;
        }
    }
    assert!(n > 0, "{target}: no corpus under fuzz/corpus/{target}");
}

#[test]
fn spiffe_id_corpus() {
    replay("spiffe_id", tessera::fuzzing::spiffe_id);
}

#[test]
fn config_corpus() {
    replay("config", tessera::fuzzing::config);
}

#[test]
fn jwt_corpus() {
    replay("jwt", tessera::fuzzing::jwt);
}

#[test]
fn token_exchange_form_corpus() {
    replay("token_exchange_form", tessera::fuzzing::token_exchange_form);
}

#[test]
fn workload_request_corpus() {
    replay("workload_request", tessera::fuzzing::workload_request);
}

#[test]
fn http2_authority_corpus() {
    replay("http2_authority", tessera::fuzzing::http2_authority);
}
