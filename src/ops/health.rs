//! Liveness and readiness. Alive: the process answers. Ready: a policy is
//! loaded, the upstream accepts TCP connections, and (with protected
//! tables) the key registry can be read with the proxy's credentials. Each
//! KMS provider's last call outcome is reported but does not decide
//! readiness: one tenant's KMS outage must not take the proxy out of a
//! load balancer for every other tenant (their refusals say KM002).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::metrics::metrics;
use crate::proxy::ServerContext;

/// How long one readiness check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Whether the check passed.
    pub ok: bool,
    /// What was found (an error message on failure).
    pub detail: String,
}

impl Check {
    fn pass(detail: impl Into<String>) -> Check {
        Check {
            ok: true,
            detail: detail.into(),
        }
    }

    fn fail(detail: impl Into<String>) -> Check {
        Check {
            ok: false,
            detail: detail.into(),
        }
    }
}

/// The body of `/readyz`.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    /// `ready` or `not ready`.
    pub status: &'static str,
    /// `policy`, `upstream`, `registry` (with protected tables).
    pub checks: BTreeMap<&'static str, Check>,
    /// Provider name → outcome of its last call (`ok`, `denied`,
    /// `transient`, `config`); absent before the first call.
    pub kms: BTreeMap<String, String>,
    /// Outcome of the last configuration reload, if any.
    pub last_reload: Option<String>,
}

impl Readiness {
    /// Whether every check passed.
    pub fn ready(&self) -> bool {
        self.checks.values().all(|c| c.ok)
    }
}

/// Runs the readiness checks.
pub async fn readiness(ctx: &ServerContext, last_reload: Option<String>) -> Readiness {
    let policy = ctx.policy();
    let mut checks = BTreeMap::new();
    checks.insert(
        "policy",
        Check::pass(format!("{} protected tables", policy.tables.len())),
    );
    let authority = ctx.upstream.authority().to_owned();
    let upstream =
        match tokio::time::timeout(CHECK_TIMEOUT, tokio::net::TcpStream::connect(&authority)).await
        {
            Ok(Ok(_)) => Check::pass(format!("{authority} accepts connections")),
            Ok(Err(e)) => Check::fail(format!("{authority}: {e}")),
            Err(_) => Check::fail(format!("{authority}: no answer within {CHECK_TIMEOUT:?}")),
        };
    checks.insert("upstream", upstream);
    if ctx.encryption.is_some() {
        checks.insert("registry", registry_check(&policy).await);
    }
    let mut readiness = Readiness {
        status: "ready",
        checks,
        kms: metrics().kms_last_outcomes(),
        last_reload,
    };
    if !readiness.ready() {
        readiness.status = "not ready";
    }
    readiness
}

/// Reads `cmk.tenants` with the proxy's own credentials.
async fn registry_check(policy: &crate::config::Policy) -> Check {
    let read = async {
        let client = crate::proxy::admin::connect(policy)
            .await
            .map_err(|e| e.to_string())?;
        client
            .query_one("SELECT count(*) FROM cmk.tenants", &[])
            .await
            .map(|row| row.get::<_, i64>(0))
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(CHECK_TIMEOUT, read).await {
        Ok(Ok(tenants)) => Check::pass(format!("cmk.tenants readable ({tenants} tenants)")),
        Ok(Err(e)) => Check::fail(e),
        Err(_) => Check::fail(format!("no answer within {CHECK_TIMEOUT:?}")),
    }
}
