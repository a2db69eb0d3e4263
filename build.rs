//! Compiles `proto/` with protox (pure Rust), so building Tessera needs no system `protoc`.
//! The descriptor set is also written out for gRPC server reflection. Also warns when the
//! bundled SQLite would be built without `HAVE_FDATASYNC` (see `.cargo/config.toml`).

use prost::Message;

/// `.cargo/config.toml` sets `LIBSQLITE3_FLAGS`, but only where Cargo reads that file (not for
/// `--manifest-path` from elsewhere, `cargo install --git`, or Tessera as a dependency), and a
/// `LIBSQLITE3_FLAGS` already in the environment takes its place. SQLite then falls back to
/// `fsync()`: as durable, slower on a journaled filesystem, and not what the README says.
fn check_sqlite_flags() {
    println!("cargo:rerun-if-env-changed=LIBSQLITE3_FLAGS");
    println!("cargo:rerun-if-env-changed=LIBSQLITE3_SYS_USE_PKG_CONFIG");
    // A system SQLite (pkg-config) comes with its own build's choice; distributions' have it.
    if std::env::var_os("LIBSQLITE3_SYS_USE_PKG_CONFIG").is_some() {
        return;
    }
    let flags = std::env::var("LIBSQLITE3_FLAGS").unwrap_or_default();
    if !flags
        .split_whitespace()
        .any(|f| f == "-DHAVE_FDATASYNC" || f == "-DHAVE_FDATASYNC=1" || f == "HAVE_FDATASYNC=1")
    {
        println!(
            "cargo:warning=the bundled SQLite is built without HAVE_FDATASYNC \
             (LIBSQLITE3_FLAGS={flags:?}): the lease store will sync its log with fsync(), \
             as durable but, on a journaled filesystem, a journal commit more per commit; \
             add -DHAVE_FDATASYNC=1 to LIBSQLITE3_FLAGS"
        );
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    check_sqlite_flags();
    let protos = [
        "proto/workload.proto",
        "proto/tessera/v1/admin.proto",
        "proto/tessera/v1/tasks.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("tessera_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
