//! `tessera`: the operator and workload CLI. Thin: parse, run, exit with its code.

use clap::Parser;

fn main() {
    // Behave like other Unix tools when piped into `head`: exit quietly on a closed pipe.
    // SAFETY: called before any other thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = tessera::cli::Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("starting the async runtime");
    std::process::exit(rt.block_on(tessera::cli::run(cli)));
}
