//! Client statements on their way to PostgreSQL when a policy is active:
//! simple queries are planned and their protected values encrypted; a
//! refused statement is replaced by one that makes the server raise the
//! refusal itself, so the transaction state of client and server agree.

use std::sync::atomic::Ordering;

use bytes::{BufMut, BytesMut};

use super::encryption::{rejection_query, Encryption, SessionInfo};
use super::state::SessionState;
use crate::protocol::messages::Parse;
use crate::protocol::{frontend, HEADER_LEN};
use crate::rewrite::{self, Rejection, StatementPlan};

/// Builds a Query message.
fn query_message(sql: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(sql.len() + 6);
    out.put_u8(frontend::QUERY);
    out.put_u32((sql.len() + 5) as u32);
    out.extend_from_slice(sql.as_bytes());
    out.put_u8(0);
    out
}

fn cstr(body: &[u8]) -> Option<&str> {
    let end = body.iter().position(|b| *b == 0)?;
    std::str::from_utf8(&body[..end]).ok()
}

/// If a read failed inside the client's transaction, the query that makes
/// the server transaction fail too; its response is swallowed, so the
/// client's next statement meets an aborted transaction (and COMMIT rolls
/// back) exactly as if the server had raised the error itself.
pub fn poison_query(state: &SessionState) -> Option<BytesMut> {
    let (code, message) = state.poison.lock().ok()?.take()?;
    let rejection = Rejection {
        sqlstate: code,
        table: None,
        column: None,
        message,
    };
    state.open_cycles.fetch_add(1, Ordering::AcqRel);
    state.client_cycles.fetch_add(1, Ordering::AcqRel);
    state.swallow.fetch_add(1, Ordering::AcqRel);
    Some(query_message(&rejection_query(&rejection)))
}

/// Returns the bytes to send instead of `frame`, or `None` to send it as is.
pub async fn client_statement(
    frame: &[u8],
    encryption: &Encryption,
    state: &SessionState,
) -> Option<BytesMut> {
    let body = frame.get(HEADER_LEN..)?;
    let tenant = state.tenant();
    let info = SessionInfo {
        tenant: tenant.as_deref(),
        user: &state.user,
        client_addr: &state.client_addr,
    };
    match frame.first().copied() {
        Some(frontend::QUERY) => {
            let sql = cstr(body)?;
            match encryption.rewrite_simple_query(sql, &info).await {
                Ok(rewrite) => {
                    if let Some(tenant) = rewrite.set_tenant {
                        if let Ok(mut slot) = state.tenant.lock() {
                            *slot = tenant;
                        }
                    }
                    if rewrite.ddl {
                        state.refresh_catalog.store(true, Ordering::Release);
                    }
                    rewrite.sql.map(|sql| query_message(&sql))
                }
                Err(rejection) => {
                    encryption.audit_rejection(&rejection, &info);
                    Some(query_message(&rejection_query(&rejection)))
                }
            }
        }
        Some(frontend::PARSE) => {
            let parse = Parse::decode(body).ok()?;
            let refusal = match rewrite::analyze(
                encryption.policy(),
                parse.query,
                parse.param_types.len(),
            ) {
                Err(rejection) => Some(rejection),
                Ok(analysis) => {
                    if analysis
                        .statements
                        .iter()
                        .any(|s| matches!(s, StatementPlan::Ddl))
                    {
                        state.refresh_catalog.store(true, Ordering::Release);
                    }
                    analysis.statements.iter().find_map(|s| match s {
                        StatementPlan::Write(plan) => Some(Rejection::unsupported(
                            &plan.table,
                            None,
                            "a write through the extended query protocol (use a simple query for now)",
                        )),
                        StatementPlan::Read => Some(Rejection::unsupported(
                            &rewrite::mentions_policy_table(encryption.policy(), parse.query).unwrap_or_default(),
                            None,
                            "reading protected tables through the extended query protocol (use a simple query for now)",
                        )),
                        StatementPlan::SetTenant(_) => Some(Rejection {
                            sqlstate: rewrite::KM003,
                            table: None,
                            column: None,
                            message: "cmk-proxy: set the tenant with a simple query (SET cmk.tenant_id = '...'), not a prepared statement".to_owned(),
                        }),
                        _ => None,
                    })
                }
            }?;
            encryption.audit_rejection(&refusal, &info);
            // The Parse fails at the server; its error is replaced by ours.
            let cycle = state.client_cycles.load(Ordering::Acquire);
            if let Ok(mut swaps) = state.error_swaps.lock() {
                swaps.push_back((cycle, refusal.sqlstate, refusal.message.clone()));
            }
            let mut out = BytesMut::new();
            Parse {
                name: parse.name,
                query: "SELECT cmk_proxy_refused_this_statement",
                param_types: Vec::new(),
            }
            .encode(&mut out);
            Some(out)
        }
        _ => None,
    }
}
