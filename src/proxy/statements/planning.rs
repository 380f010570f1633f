//! What a Parse or a simple query is planned to: the analysis of its SQL
//! against the catalog, and the tenant a Bind sets.

use super::*;

/// The tenant a Bind of `set_config('<tenant setting>', $n, local)` sets:
/// the parameter's text (text format, or binary of a text type, which is
/// the same bytes). NULL resets the setting to the session's default. A
/// value the proxy cannot read as text (another binary type, empty) clears
/// the session tenant, the safe direction: writes then need the tenant in
/// the statement.
pub(super) fn bound_tenant(statement: &PreparedStatement, bind: &Bind<'_>) -> Option<TenantChange> {
    /// text, varchar, bpchar, name, or not declared (the server infers text).
    const TEXT_TYPES: [u32; 5] = [0, 25, 1043, 1042, 19];
    let StatementKind::SetTenantParam { param, local } = statement.kind else {
        return None;
    };
    let index = param.checked_sub(1)?;
    let declared = statement.declared.get(index).copied().unwrap_or(0);
    let readable = format_of(&bind.param_formats, index) == 0 || TEXT_TYPES.contains(&declared);
    let value = bind.params.get(index).copied()?;
    let Some(value) = value else {
        return Some(TenantChange::reset(local));
    };
    let tenant = Some(value)
        .filter(|_| readable)
        .and_then(|bytes| std::str::from_utf8(bytes).ok())
        .filter(|text| !text.is_empty())
        .map(str::to_owned);
    Some(TenantChange::to(tenant, local))
}

/// Plans a Parse: the shared plan, and the Parse to send instead (`None`:
/// the original). `Err`: refused.
pub(super) fn plan_parse(
    parse: &Parse<'_>,
    epoch: u64,
    encryption: &Encryption,
    state: &SessionState,
) -> Result<(Arc<ParsePlan>, Option<BytesMut>), Rejection> {
    if let Some(rejection) = nonstandard_strings_refusal(parse.query, encryption, state) {
        return Err(rejection);
    }
    let plan = encryption.parse_plan(parse.query, &parse.param_types, epoch, || {
        plan_sql(parse.query, &parse.param_types, encryption)
    })?;
    if plan.ddl {
        state.refresh_catalog.store(true, Ordering::Release);
    }
    let replacement = plan.rewritten.as_ref().map(|(sql, types)| {
        let mut out = BytesMut::with_capacity(sql.len() + parse.name.len() + 16 + 4 * types.len());
        Parse {
            name: parse.name,
            query: sql,
            param_types: types.clone(),
        }
        .encode(&mut out);
        out
    });
    Ok((plan, replacement))
}

/// Plans the SQL of a Parse with its declared parameter types.
pub(super) fn plan_sql(
    query: &str,
    param_types: &[u32],
    encryption: &Encryption,
) -> Result<ParsePlan, Rejection> {
    let catalog = encryption.catalog();
    let analysis = rewrite::analyze_in(
        catalog.analysis_policy(&encryption.policy()),
        catalog.schema_facts(),
        query,
        param_types.len(),
    )?;
    let mut plan = ParsePlan {
        sql: Arc::from(query),
        kind: StatementKind::Plain,
        client_params: analysis.client_params,
        presented: Vec::new(),
        fingerprint: Arc::from(""),
        rewritten: None,
        ddl: analysis
            .statements
            .iter()
            .any(|s| matches!(s, StatementPlan::Ddl)),
        hidden_results: 0,
        row_plans: Arc::default(),
    };
    // The server refuses several statements in one Parse by itself.
    let [statement] = analysis.statements.as_slice() else {
        return Ok(plan);
    };
    match statement {
        StatementPlan::Copy(_) => {
            return Err(Rejection::unsupported(
                "",
                None,
                "COPY on a protected table through the extended protocol (use a simple query)",
            ))
        }
        StatementPlan::Untouched | StatementPlan::Ddl => {}
        StatementPlan::Read => plan.fingerprint = Arc::from(rewrite::fingerprint(query)),
        StatementPlan::ReadRowTenants(read) => {
            plan.fingerprint = Arc::from(rewrite::fingerprint(query));
            plan.rewritten = Some((read.sql.clone(), param_types.to_vec()));
            plan.hidden_results = read.hidden;
        }
        StatementPlan::SetTenant(change) => plan.kind = StatementKind::SetTenant(change.clone()),
        StatementPlan::SetTenantParam { param, local } => {
            plan.kind = StatementKind::SetTenantParam {
                param: *param,
                local: *local,
            }
        }
        StatementPlan::Write(write) => {
            let mut types: Vec<u32> = param_types.to_vec();
            types.resize(analysis.client_params + write.extra_params, 0);
            for cell in write.rows.iter().flat_map(|row| &row.cells) {
                if let ValueSource::Param(n) = cell.value {
                    // PostgreSQL reports a type the client declared as
                    // declared; otherwise the column's plaintext type.
                    let declared = param_types.get(n - 1).copied().unwrap_or(0);
                    let shown = if declared == 0 {
                        cell.ty.oid()
                    } else {
                        declared
                    };
                    plan.presented.push((n - 1, shown));
                }
            }
            for lookup in &write.lookups {
                for slot in &lookup.values {
                    let (n, oid) = match slot.value {
                        rewrite::LookupValue::Param(n) => (n, lookup.ty.oid()),
                        rewrite::LookupValue::ArrayParam(n) => (n, lookup.ty.array_oid()),
                        rewrite::LookupValue::Literal(_) => continue,
                    };
                    let declared = param_types.get(n - 1).copied().unwrap_or(0);
                    plan.presented
                        .push((n - 1, if declared == 0 { oid } else { declared }));
                }
            }
            for cells in write.unnest.iter().flat_map(|u| &u.cells) {
                if let rewrite::ArraySource::Param(n) = cells.source {
                    let declared = param_types.get(n - 1).copied().unwrap_or(0);
                    let shown = if declared == 0 {
                        cells.ty.array_oid()
                    } else {
                        declared
                    };
                    plan.presented.push((n - 1, shown));
                }
            }
            plan.hidden_results = write.hidden_results;
            write.declare_proxy_params(&mut types);
            plan.rewritten = Some((write.statement.to_string(), types));
            plan.fingerprint = Arc::from(rewrite::fingerprint(query));
            plan.kind = StatementKind::Write(Arc::new((**write).clone()));
        }
    }
    Ok(plan)
}

/// The refusal of SQL the proxy may misread because the session's strings
/// are not standard-conforming (see `rewrite::nonstandard_strings_refusal`).
pub(super) fn nonstandard_strings_refusal(
    sql: &str,
    encryption: &Encryption,
    state: &SessionState,
) -> Option<Rejection> {
    if !state.nonstandard_strings.load(Ordering::Acquire) {
        return None;
    }
    let catalog = encryption.catalog();
    rewrite::nonstandard_strings_refusal(
        catalog.analysis_policy(&encryption.policy()),
        catalog.schema_facts(),
        sql,
    )
}
