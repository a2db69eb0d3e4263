//! `tesserad`: the Tessera daemon. Thin: parse arguments, set up logging, run the app.

use std::path::PathBuf;

use anyhow::Context;

// Issuance allocates many small short-lived buffers per request (DER, protobuf, HTTP/2
// frames); mimalloc's thread-local free lists measurably cut that cost (see the benchmark).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::Parser;
use tessera::config::{Config, LogFormat};

/// Tessera workload-identity daemon: serves short-lived SPIFFE SVIDs over the Workload API.
///
/// With no --config it runs on built-in defaults and serves an identity to the user who
/// started it.
#[derive(Debug, Parser)]
#[command(name = "tesserad", version)]
struct Args {
    /// TOML config file (every key optional).
    #[arg(long, short = 'c', env = "TESSERA_CONFIG")]
    config: Option<PathBuf>,
    /// Check the config and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tesserad: {e}");
            std::process::exit(2);
        }
    };
    if args.check_config {
        let policy = match tessera::policy::Engine::load(
            cfg.policy_file.as_deref(),
            cfg.policy_schema.as_deref(),
        ) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("tesserad: {e}");
                std::process::exit(2);
            }
        };
        // What start-up would load from other files, so ExecStartPre catches it too.
        match tessera::app::check_files(&cfg) {
            Ok(warnings) => {
                for w in warnings {
                    eprintln!("tesserad: warning: {w}");
                }
            }
            Err(e) => {
                eprintln!("tesserad: {e}");
                std::process::exit(2);
            }
        }
        println!(
            "config OK: trust domain {}, {} entries, {} OIDC issuers, {} policies",
            cfg.trust_domain,
            cfg.entries.len(),
            cfg.oidc_issuers.len(),
            policy.len()
        );
        return Ok(());
    }
    init_tracing(&cfg);
    // With transparent huge pages khugepaged collapses mimalloc's arena into 2 MiB pages: at
    // the same load RSS sat ~10 MiB higher, and any small heap growth showed as a 2 MiB step
    // (soak, smaps AnonHugePages). A node daemon should keep a small, predictable footprint,
    // and an issuance A/B showed no cost from giving up the TLB gain.
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        tracing::debug!("could not disable transparent huge pages: {e}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tesserad")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let running = tessera::app::build(cfg)
            .await
            .context("tesserad could not start")?;
        let failed = wait_for_signal(&running).await?;
        tracing::info!("shutting down");
        running.shutdown().await;
        match failed {
            // A non-zero exit, so a supervisor (systemd `Restart=on-failure`) starts it again.
            Some(reason) => Err(anyhow::anyhow!(
                "stopped because the lease store could not confirm a commit ({reason}); \
                 starting again reads what the disk holds"
            )),
            None => Ok(()),
        }
    })
}

fn init_tracing(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log_level));
    // Colour only for a person at a terminal: in a file or a pipe the escape codes are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match cfg.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Waits for SIGTERM or SIGINT, or for the lease store to fail (its reason is returned);
/// SIGHUP reloads the policy file meanwhile.
async fn wait_for_signal(running: &tessera::app::Running) -> anyhow::Result<Option<String>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(None),
            _ = int.recv() => return Ok(None),
            reason = running.store_failed() => return Ok(Some(reason)),
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the policy file");
                running.reload();
            }
        }
    }
}
