//! A simple query on its way to PostgreSQL: planned, encrypted, or a COPY
//! the proxy takes part in.

use super::*;

/// A simple query as the client sent it.
pub(super) struct SimpleQuery<'a> {
    pub(super) frame: &'a [u8],
    pub(super) body: &'a [u8],
    pub(super) encryption: &'a Encryption,
    pub(super) state: &'a SessionState,
}

/// A simple query: planned, its protected values encrypted, or replaced by
/// a query that raises the refusal at the server. A write planned by its
/// shape runs as the proxy's own prepared statement.
pub(super) async fn simple_query(
    query: SimpleQuery<'_>,
    is_prepared: impl Fn(&str) -> bool,
    sql_prepared: &mut SqlPrepared,
    copy_in: &mut Option<Box<CopyIn>>,
) -> BytesMut {
    let SimpleQuery {
        frame,
        body,
        encryption,
        state,
    } = query;
    let tenant = state.tenant();
    let info = state.session_info(tenant.as_deref());
    let Some(sql) = cstr(body) else {
        state.pending.push(Expected::query());
        return match unreadable_sql_refusal(body, encryption) {
            Some(rejection) => {
                encryption.audit_rejection(&rejection, &info);
                query_message(&rejection_query(&rejection))
            }
            None => BytesMut::from(frame),
        };
    };
    let words = StatementWords::of(sql);
    if words.drops {
        state.own_statements(OwnStatements::clear);
    }
    let refusal = nonstandard_strings_refusal(sql, encryption, state)
        .or_else(|| words.names_own.then(own_name_rejection))
        .or_else(|| sql_execute_refusal(sql, words, &is_prepared))
        .or_else(|| sql_prepared.refusal(sql, words, encryption, state));
    if let Some(rejection) = refusal {
        encryption.audit_rejection(&rejection, &info);
        state.pending.push(Expected::query());
        return query_message(&rejection_query(&rejection));
    }
    let cycle = state.cycles_sent.load(Ordering::Acquire);
    let rewritten = encryption
        .rewrite_simple_query(sql, &info)
        .await
        .and_then(|rewrite| {
            follow_schema_flux(sql, rewrite.ddl, cycle, encryption, state)?;
            Ok(rewrite)
        });
    let rewritten = rewritten.and_then(|rewrite| {
        if rewrite.copy.is_some() && state.client_encoding_not_utf8() {
            return Err(Rejection::unsupported(
                "",
                None,
                "COPY with a client_encoding other than UTF8",
            ));
        }
        Ok(rewrite)
    });
    match rewritten {
        Ok(rewrite) => {
            sql_prepared.follow(sql, words);
            let copy = rewrite.copy.as_ref().map(|copy| match copy {
                CopyRewrite::In(plan) => {
                    let max_row = encryption.policy().server.max_message_size;
                    let (copy, response) = CopyIn::start(plan.clone(), tenant.clone(), max_row);
                    *copy_in = Some(Box::new(copy));
                    response
                }
                CopyRewrite::Out(options) => Arc::new(CopyResponse::Out(options.clone())),
            });
            for change in rewrite.tenant_changes {
                state.change_tenant(change, false);
            }
            if rewrite.ddl {
                // It may change what a statement of the proxy's returns.
                state.own_statements(OwnStatements::clear);
            }
            let run = rewrite.bound.as_ref().map(|b| {
                state.own_statements(|own| own.statement_for(&b.sql, &b.types, &b.catalog))
            });
            // The catalog is reloaded at this query's own ReadyForQuery,
            // not at one still on its way for an earlier query.
            // Where executions do not name their columns' origins, one
            // statement runs described (a COPY TO as its SELECT; a COPY
            // FROM stays a simple query).
            let described = rewrite.one_statement
                && run.is_none()
                && !matches!(copy.as_deref(), Some(CopyResponse::In { .. }))
                && encryption.catalog().traces_by_statement();
            state.pending.push(Expected::Query {
                swallow: false,
                fingerprint: rewrite.fingerprint.unwrap_or_else(|| Arc::from("")),
                refresh: rewrite.ddl,
                run_as: run.as_ref().map(|r| r.number),
                extended: run.is_some() || described,
                copy,
            });
            if let (Some(bound), Some(run)) = (&rewrite.bound, &run) {
                // Its Sync ends a skip-to-Sync at the server, as the
                // client's own do.
                state.syncs.fetch_add(1, Ordering::AcqRel);
                return bound_query_messages(bound, run);
            }
            if described {
                state.syncs.fetch_add(1, Ordering::AcqRel);
                return described_query_messages(rewrite.sql.as_deref().unwrap_or(sql));
            }
            rewrite
                .sql
                .map_or_else(|| BytesMut::from(frame), |sql| query_message(&sql))
        }
        Err(rejection) => {
            encryption.audit_rejection(&rejection, &info);
            state.pending.push(Expected::query());
            query_message(&rejection_query(&rejection))
        }
    }
}
