//! The `cmk-proxy` binary: parses the command line and hands over to `cli`.

use clap::Parser;

/// The proxy allocates and frees short-lived buffers of 1–4 KiB for every
/// statement; with glibc's malloc about 15 % of its user time went to the
/// allocator (perf, `integration/bench/encrypted.sh`). mimalloc's
/// per-thread free lists make that cheap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let cli = cmk_proxy::cli::Cli::parse();
    let code = match cmk_proxy::cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cmk-proxy: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
