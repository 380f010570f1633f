//! Log output: human-readable or JSON lines on stderr, filtered by
//! `server.log_level`, else `RUST_LOG`, else `info`; the filter can be
//! replaced while running (configuration reload).

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Replaces the installed filter (the handle's type depends on the format).
type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

static SET_FILTER: OnceLock<SetFilter> = OnceLock::new();

/// The filter for `level` (`server.log_level`), else `RUST_LOG`, else `info`.
pub fn filter(level: Option<&str>) -> Result<EnvFilter, String> {
    match level {
        Some(level) => {
            EnvFilter::try_new(level).map_err(|e| format!("server.log_level {level:?}: {e}"))
        }
        None => Ok(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))),
    }
}

/// Installs the global subscriber once; later calls are ignored.
pub fn init(format: LogFormat, filter: EnvFilter) {
    // Filter reloading goes last: it fixes the builder's type parameters.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            if builder.try_init().is_ok() {
                let _ = SET_FILTER.set(Box::new(move |f| {
                    handle.reload(f).map_err(|e| e.to_string())
                }));
            }
        }
        LogFormat::Json => {
            let builder = builder
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            if builder.try_init().is_ok() {
                let _ = SET_FILTER.set(Box::new(move |f| {
                    handle.reload(f).map_err(|e| e.to_string())
                }));
            }
        }
    }
}

/// Replaces the log filter of the running process.
pub fn set_filter(filter: EnvFilter) -> Result<(), String> {
    match SET_FILTER.get() {
        Some(set) => set(filter),
        None => Err("logging is not initialised".to_owned()),
    }
}
