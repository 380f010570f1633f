//! The `cmk-proxy` binary: parses the command line and hands over to `cli`.

use clap::Parser;

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
