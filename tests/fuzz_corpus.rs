//! Replays every input the fuzzers kept (`fuzz/corpus/<target>/`) and every crash they found
//! (`fuzz/regressions/<target>/`) through the same harnesses, on stable Rust, as part of
//! `cargo test`: a fixed bug stays fixed without running the fuzzers.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Every fuzz target; `every_target_is_replayed` holds this to `fuzz/fuzz_targets/`.
const TARGETS: &[&str] = &[
    "spiffe_id",
    "config",
    "jwt",
    "jwt_validate",
    "token_exchange_form",
    "workload_request",
    "http2_authority",
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The inputs of `target`: its corpus, which must not be empty, and any crash inputs.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for dir in ["corpus", "regressions"] {
        let path = fuzz_dir().join(dir).join(target);
        let entries = match std::fs::read_dir(&path) {
            Ok(e) => e,
            Err(e) if dir == "regressions" && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        for e in entries {
            let path = e.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            out.push((path, data));
        }
        assert!(
            dir != "corpus" || !out.is_empty(),
            "{target}: no corpus under fuzz/corpus/{target}"
        );
    }
    out
}

fn replay<R>(target: &str, harness: fn(&[u8]) -> R) -> Vec<R> {
    inputs(target)
        .into_iter()
        .map(|(path, data)| {
            std::panic::catch_unwind(|| harness(&data))
                .unwrap_or_else(|_| panic!("{target}: {} panics", path.display()))
        })
        .collect()
}

#[test]
fn every_target_is_replayed() {
    let names = |dir: &str, strip: &str| -> BTreeSet<String> {
        std::fs::read_dir(fuzz_dir().join(dir))
            .unwrap()
            .map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                name.strip_suffix(strip).unwrap_or(&name).to_owned()
            })
            .collect()
    };
    let listed: BTreeSet<String> = TARGETS.iter().map(|t| (*t).to_owned()).collect();
    assert_eq!(names("fuzz_targets", ".rs"), listed, "fuzz/fuzz_targets");
    assert_eq!(names("corpus", ""), listed, "fuzz/corpus");
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
fn jwt_validate_corpus() {
    let accepted = replay("jwt_validate", tessera::fuzzing::jwt_validate);
    // The corpus reaches past the signature: some of its tokens each validator accepts, and
    // so had their claims checked against the standards' rules.
    assert!(accepted.iter().any(|a| a.jwt_svid), "no JWT-SVID accepted");
    assert!(
        accepted.iter().any(|a| a.subject_token),
        "no subject token accepted"
    );
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

#[test]
fn the_fuzzers_build_the_daemons_dependency_versions() {
    // `fuzz/` is a workspace of its own with its own lock file: a package both use must be
    // a version the daemon builds too, or the fuzzers test other code than the daemon runs.
    let versions = |path: PathBuf| -> std::collections::BTreeMap<String, BTreeSet<String>> {
        let text = std::fs::read_to_string(&path).unwrap();
        let lock: toml::Table = toml::from_str(&text).unwrap();
        let mut out = std::collections::BTreeMap::<String, BTreeSet<String>>::new();
        for p in lock["package"].as_array().unwrap() {
            out.entry(p["name"].as_str().unwrap().to_owned())
                .or_default()
                .insert(p["version"].as_str().unwrap().to_owned());
        }
        out
    };
    let daemon = versions(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock"));
    let fuzz = versions(fuzz_dir().join("Cargo.lock"));
    let differ: Vec<_> = fuzz
        .iter()
        .filter_map(|(name, v)| {
            let d = daemon.get(name)?;
            (!v.is_subset(d)).then(|| format!("{name}: {v:?} in fuzz/, {d:?} in the daemon's"))
        })
        .collect();
    assert!(
        differ.is_empty(),
        "copy Cargo.lock to fuzz/Cargo.lock and run `cargo metadata` in fuzz/: {differ:#?}"
    );
}
