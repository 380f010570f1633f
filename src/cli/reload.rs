//! `cmk-proxy reload --pid-file F`: sends SIGHUP to the `serve` process
//! whose pid is in F (written by `serve --pid-file F`). The outcome is in
//! that process's log and in `cmk_proxy_config_reloads_total`; `POST
//! /reload` on the admin endpoint answers with it instead.

use std::path::PathBuf;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Ask a running proxy to reload its configuration.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The pid file `serve --pid-file` wrote.
    #[arg(long)]
    pub pid_file: PathBuf,
}

/// Runs the subcommand.
pub fn run(args: Args) -> anyhow::Result<i32> {
    let text = match std::fs::read_to_string(&args.pid_file) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("cmk-proxy: cannot read {}: {e}", args.pid_file.display());
            return Ok(1);
        }
    };
    let pid = match text.trim().parse::<i32>() {
        Ok(pid) if pid > 0 => pid,
        _ => {
            eprintln!(
                "cmk-proxy: {} does not hold a process id",
                args.pid_file.display()
            );
            return Ok(1);
        }
    };
    match kill(Pid::from_raw(pid), Signal::SIGHUP) {
        Ok(()) => {
            println!("reload requested (SIGHUP sent to process {pid})");
            Ok(0)
        }
        Err(e) => {
            eprintln!("cmk-proxy: cannot signal process {pid}: {e}");
            Ok(1)
        }
    }
}
