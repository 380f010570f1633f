//! A throwaway Citus cluster on loopback: a coordinator and workers, each a
//! [`LocalPostgres`] with Citus preloaded, the extension created in the
//! `app` database and the workers added to the coordinator's metadata.
//!
//! The nodes start without TLS of their own: `CREATE EXTENSION citus` turns
//! SSL on with a self-signed X.509 v1 certificate, as on a fresh Citus
//! install, so the proxy meets what a new user meets.

use std::path::PathBuf;

use super::{Installation, LocalPgError, LocalPostgres, LocalPostgresOptions};

/// The database the cluster distributes (the test roles' `app`).
pub const DATABASE: &str = "app";

/// Where Citus is, or why it is not installed.
pub fn installed() -> Result<PathBuf, String> {
    let inst = Installation::get().map_err(|e| e.to_string())?;
    let lib = inst.bindir.parent().map(|p| p.join("lib").join("citus.so"));
    match lib {
        Some(path) if path.is_file() => Ok(path),
        Some(path) => Err(format!(
            "{} is missing (scripts/install-deps.sh builds Citus from ../shared/vendor/citus)",
            path.display()
        )),
        None => Err("no PostgreSQL library directory".to_owned()),
    }
}

/// A running Citus cluster; dropping it stops every node.
#[derive(Debug)]
pub struct LocalCitus {
    /// The coordinator: applications (and the proxy) connect here.
    pub coordinator: LocalPostgres,
    /// The workers, which hold the shards.
    pub workers: Vec<LocalPostgres>,
}

impl LocalCitus {
    /// Starts a coordinator and `workers` workers (blocking).
    pub fn start(workers: usize) -> Result<Self, LocalPgError> {
        let node = || {
            LocalPostgres::start(LocalPostgresOptions {
                tls: false,
                preload: "citus".to_owned(),
                ..LocalPostgresOptions::default()
            })
        };
        let coordinator = node()?;
        let workers = (0..workers)
            .map(|_| node())
            .collect::<Result<Vec<_>, _>>()?;
        for pg in std::iter::once(&coordinator).chain(&workers) {
            pg.psql(DATABASE, "CREATE EXTENSION citus")?;
        }
        coordinator.psql(
            DATABASE,
            &format!(
                "SELECT citus_set_coordinator_host('127.0.0.1', {})",
                coordinator.port()
            ),
        )?;
        for worker in &workers {
            coordinator.psql(
                DATABASE,
                &format!("SELECT citus_add_node('127.0.0.1', {})", worker.port()),
            )?;
        }
        Ok(Self {
            coordinator,
            workers,
        })
    }
}
