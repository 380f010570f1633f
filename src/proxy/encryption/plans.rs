//! What the proxy makes of a Parse, shared by every session that sends the
//! same one: how its executions are handled, what it sends instead, and
//! whether another plan of the same SQL would run differently.

use std::sync::Arc;

use crate::proxy::results::RowPlanMemo;
use crate::rewrite::{TenantChange, WritePlan};

/// What the proxy does with the executions of a prepared statement.
#[derive(Debug, Clone)]
pub(crate) enum StatementKind {
    /// Parameters pass unchanged; results are decrypted by their columns.
    Plain,
    /// A write whose protected values are encrypted at every Bind.
    Write(Arc<WritePlan>),
    /// `SET <tenant setting> = …`: changes the session tenant when executed.
    SetTenant(TenantChange),
    /// `set_config('<tenant setting>', $n, local)`: the tenant is the value
    /// each Bind gives parameter `param` (1-based).
    SetTenantParam { param: usize, local: bool },
}

/// What the proxy makes of one Parse (SQL and declared parameter types),
/// shared by every session that sends the same one until the catalog
/// changes: drivers that use unnamed statements send the same Parse for
/// every execution.
#[derive(Debug)]
pub struct ParsePlan {
    /// The client's SQL, as planned.
    pub(crate) sql: Arc<str>,
    pub(crate) kind: StatementKind,
    pub(crate) client_params: usize,
    pub(crate) presented: Vec<(usize, u32)>,
    pub(crate) fingerprint: Arc<str>,
    /// SQL and parameter types sent instead of the client's.
    pub(crate) rewritten: Option<(String, Vec<u32>)>,
    /// The statement changes the schema.
    pub(crate) ddl: bool,
    /// Result columns the proxy added after the client's (row tenants).
    pub(crate) hidden_results: usize,
    /// The plans of its result rows, shared by the sessions that prepare it.
    pub(crate) row_plans: Arc<RowPlanMemo>,
}

impl ParsePlan {
    /// True when the statement changes the schema (never cached).
    pub fn is_ddl(&self) -> bool {
        self.ddl
    }

    /// True when executions planned by `other` (the same SQL planned
    /// against a newer catalog) run exactly as this plan's: the same SQL
    /// reaches the server, the same parameters are sealed, results are
    /// audited alike. A prepared statement whose plan differs from its
    /// replanning must not run on the old one.
    pub(crate) fn runs_as(&self, other: &ParsePlan) -> bool {
        let same_kind = match (&self.kind, &other.kind) {
            (StatementKind::Plain, StatementKind::Plain) => true,
            // The rewritten SQL, compared below, is the write's whole plan.
            (StatementKind::Write(_), StatementKind::Write(_)) => true,
            // Both follow from the SQL text alone, never from the catalog.
            (StatementKind::SetTenant(_), StatementKind::SetTenant(_)) => true,
            (
                StatementKind::SetTenantParam { param, local },
                StatementKind::SetTenantParam {
                    param: other_param,
                    local: other_local,
                },
            ) => param == other_param && local == other_local,
            _ => false,
        };
        same_kind
            && self.client_params == other.client_params
            && self.presented == other.presented
            && self.rewritten == other.rewritten
            && self.ddl == other.ddl
            && self.hidden_results == other.hidden_results
            && self.fingerprint.is_empty() == other.fingerprint.is_empty()
    }
}
