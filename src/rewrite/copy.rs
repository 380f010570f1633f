//! COPY on a policy table: the plan of `COPY t (cols) FROM STDIN` (which
//! client field is what, and the COPY PostgreSQL receives instead) and of
//! `COPY … TO STDOUT` (the SELECT the proxy runs instead, read by the
//! ordinary read analysis). Options the proxy cannot reproduce exactly are
//! refused here, before the client is asked for data (docs/COPY.md).

use pg_query::protobuf::{CopyStmt, DefElem, RangeVar};
use pg_query::{DeparseOptions, NodeEnum};
use sqlparser::ast::{Ident, ObjectName};

use super::analyze::{SchemaFacts, Scope, StatementPlan};
use super::names::policy_table;
use super::pg_reading::PgReading;
use super::Rejection;
use crate::config::{DeclaredType, Policy, SearchMode, TablePolicy};
use crate::values::copy::{CopyFormat, CopyOptions};

/// What one field of the client's COPY data is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyFieldRole {
    /// An unprotected column: relayed (re-escaped) as the client wrote it.
    Plain,
    /// The tenant column: relayed, and the row's tenant.
    Tenant,
    /// A protected column: sealed, with its blind index when searchable.
    Protected {
        /// Column name.
        column: String,
        /// Declared plaintext type.
        ty: DeclaredType,
        /// It has a blind index column, written after the EDEK column.
        searchable: bool,
    },
    /// The EDEK or a blind-index column: the client's value is dropped, the
    /// proxy writes its own.
    Ignored,
}

/// `COPY <policy table> (cols) FROM STDIN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyInPlan {
    /// `schema.table` (policy key).
    pub table: String,
    /// The table name as PostgreSQL names it in `COPY t, line N`.
    pub shown_table: String,
    /// The client's columns, in order.
    pub names: Vec<String>,
    /// What each client field is.
    pub roles: Vec<CopyFieldRole>,
    /// The tenant column's name.
    pub tenant_column: String,
    /// The client's data format.
    pub options: CopyOptions,
    /// The COPY PostgreSQL receives (default text format; the kept client
    /// columns, the tenant column when the client names none, then the EDEK
    /// column, then the blind indexes).
    pub upstream_sql: String,
}

impl CopyInPlan {
    /// True when some field is the tenant column.
    pub fn names_tenant(&self) -> bool {
        self.roles.contains(&CopyFieldRole::Tenant)
    }
}

/// `COPY <policy table> [(cols)] TO STDOUT` or `COPY (query) TO STDOUT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOutPlan {
    /// The SELECT run instead (still to be planned as a read).
    pub select_sql: String,
    /// The client's output format.
    pub options: CopyOptions,
}

/// A COPY statement that involves protected data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyPlan {
    /// COPY FROM STDIN into a policy table.
    In(CopyInPlan),
    /// COPY TO STDOUT of a policy table or a query.
    Out(CopyOutPlan),
}

/// The plan of a query string that is one COPY of a policy table, or of a
/// query over protected data, as PostgreSQL's grammar reads it (`None`:
/// not such a COPY, planned as any other statement). sqlparser cannot
/// read `COPY … FROM STDIN WITH (…)` without the inline data of a script.
pub(super) fn copy_of(
    scope: &Scope<'_>,
    facts: &SchemaFacts,
    reading: &PgReading,
) -> Option<Result<CopyPlan, Rejection>> {
    if reading.len() != 1 {
        return None;
    }
    let Some(NodeEnum::CopyStmt(copy)) = reading.statement(0) else {
        return None;
    };
    let policy = scope.policy;
    match (&copy.relation, &copy.query) {
        (Some(relation), _) => {
            let name = relation_name(relation);
            let (table, table_policy) = policy_table(policy, &name)?;
            Some(plan_table_copy(
                policy,
                facts,
                copy,
                relation,
                table,
                table_policy,
            ))
        }
        (None, Some(query)) => {
            let select_sql = query
                .node
                .as_ref()?
                .deparse(DeparseOptions::default())
                .ok()?;
            match read_plan(policy, facts, &select_sql) {
                Ok(None) => None,
                Ok(Some(sql)) => Some(plan_out(copy, sql, &[], "")),
                Err(rejection) => Some(Err(rejection)),
            }
        }
        (None, None) => None,
    }
}

/// The SQL a COPY TO runs as: the read analysis of `select_sql` (`None`:
/// it touches no protected data).
fn read_plan(
    policy: &Policy,
    facts: &SchemaFacts,
    select_sql: &str,
) -> Result<Option<String>, Rejection> {
    let analysis = super::analyze_in(policy, facts, select_sql, 0)?;
    match analysis.statements.as_slice() {
        [StatementPlan::Untouched] => Ok(None),
        [StatementPlan::Read] => Ok(Some(select_sql.to_owned())),
        [StatementPlan::ReadRowTenants(read)] => Ok(Some(read.sql.clone())),
        _ => Err(Rejection::unsupported(
            "",
            None,
            "this query in COPY (…) TO STDOUT (only a SELECT is)",
        )),
    }
}

fn relation_name(relation: &RangeVar) -> ObjectName {
    let mut parts = Vec::new();
    if !relation.schemaname.is_empty() {
        parts.push(Ident::with_quote('"', relation.schemaname.as_str()));
    }
    parts.push(Ident::with_quote('"', relation.relname.as_str()));
    ObjectName::from(parts)
}

fn plan_table_copy(
    policy: &Policy,
    facts: &SchemaFacts,
    copy: &CopyStmt,
    relation: &RangeVar,
    table: &str,
    table_policy: &TablePolicy,
) -> Result<CopyPlan, Rejection> {
    let names: Vec<String> = copy
        .attlist
        .iter()
        .filter_map(|n| match &n.node {
            Some(NodeEnum::String(s)) => Some(s.sval.clone()),
            _ => None,
        })
        .collect();
    if copy.is_from {
        let options = copy_options(copy, &names, table)?;
        if names.is_empty() {
            return Err(Rejection::unsupported(
                table,
                None,
                "COPY FROM without a column list (name the columns: COPY t (a, b, …) FROM STDIN)",
            ));
        }
        return Ok(plan_copy_in(
            table,
            &relation.relname,
            table_policy,
            names,
            options,
        ));
    }
    // The EDEK and blind-index columns a client names (pg_dump names every
    // column) are printed as NULL: a reader never sees them, and a restore
    // through the proxy writes its own (docs/COPY.md).
    let derived = |name: &str| {
        name == table_policy.edek_column
            || name
                .strip_suffix("_bidx")
                .and_then(|base| table_policy.columns.get(base))
                .is_some_and(|c| c.search == SearchMode::Equality)
    };
    let list = if names.is_empty() {
        "*".to_owned()
    } else {
        names
            .iter()
            .map(|n| match derived(n) {
                true => format!("NULL AS {}", quote_ident(n)),
                false => quote_ident(n),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let qualified = match relation.schemaname.as_str() {
        "" => quote_ident(&relation.relname),
        schema => format!("{}.{}", quote_ident(schema), quote_ident(&relation.relname)),
    };
    // COPY TO reads the table itself, never its children (sqlparser cannot
    // read `FROM ONLY`): a table with children is refused.
    if facts.children.values().any(|parent| parent == table) {
        return Err(Rejection::unsupported(
            table,
            None,
            "COPY TO of a table with partitions or inheritance children (use COPY (SELECT …) TO)",
        ));
    }
    let select_sql = format!("SELECT {list} FROM {qualified}");
    let sql = read_plan(policy, facts, &select_sql)?.unwrap_or(select_sql);
    plan_out(copy, sql, &names, table)
}

fn plan_out(
    copy: &CopyStmt,
    sql: String,
    names: &[String],
    table: &str,
) -> Result<CopyPlan, Rejection> {
    let options = copy_options(copy, names, table)?;
    Ok(CopyPlan::Out(CopyOutPlan {
        select_sql: sql,
        options,
    }))
}

fn plan_copy_in(
    table: &str,
    relname: &str,
    table_policy: &TablePolicy,
    names: Vec<String>,
    options: CopyOptions,
) -> CopyPlan {
    let mut roles = Vec::with_capacity(names.len());
    let mut upstream = Vec::with_capacity(names.len() + 2);
    let mut indexes = Vec::new();
    for name in &names {
        let is_index = name
            .strip_suffix("_bidx")
            .and_then(|base| table_policy.columns.get(base))
            .is_some_and(|c| c.search == SearchMode::Equality);
        let role = if *name == table_policy.edek_column || is_index {
            CopyFieldRole::Ignored
        } else if *name == table_policy.tenant_column {
            CopyFieldRole::Tenant
        } else if let Some(column) = table_policy.columns.get(name) {
            let searchable = column.search == SearchMode::Equality;
            if searchable {
                indexes.push(format!("{name}_bidx"));
            }
            CopyFieldRole::Protected {
                column: name.clone(),
                ty: column.ty,
                searchable,
            }
        } else {
            CopyFieldRole::Plain
        };
        // A column named twice is PostgreSQL's error (42701), still raised
        // by the COPY it receives.
        if role != CopyFieldRole::Ignored {
            upstream.push(quote_ident(name));
        }
        roles.push(role);
    }
    if !roles.contains(&CopyFieldRole::Tenant) {
        // Rows sealed for the session tenant are stored as that tenant's.
        upstream.push(quote_ident(&table_policy.tenant_column));
    }
    upstream.push(quote_ident(&table_policy.edek_column));
    upstream.extend(indexes.iter().map(|n| quote_ident(n)));
    let qualified = table
        .split_once('.')
        .map(|(schema, name)| format!("{}.{}", quote_ident(schema), quote_ident(name)))
        .unwrap_or_else(|| quote_ident(table));
    CopyPlan::In(CopyInPlan {
        table: table.to_owned(),
        shown_table: relname.to_owned(),
        names,
        roles,
        tenant_column: table_policy.tenant_column.clone(),
        options,
        upstream_sql: format!("COPY {qualified} ({}) FROM STDIN", upstream.join(", ")),
    })
}

/// `"name"`, quotes doubled.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The client's options as PostgreSQL reads them (`ProcessCopyOptions`),
/// its defaults filled in; an option the proxy cannot reproduce is KM003.
fn copy_options(copy: &CopyStmt, names: &[String], table: &str) -> Result<CopyOptions, Rejection> {
    let refuse = |what: String| Rejection::unsupported(table, None, &what);
    if copy.is_program || !copy.filename.is_empty() {
        return Err(refuse(
            "COPY to or from a server file or program".to_owned(),
        ));
    }
    if copy.where_clause.is_some() {
        return Err(refuse("COPY FROM … WHERE".to_owned()));
    }
    let elements: Vec<&DefElem> = copy
        .options
        .iter()
        .filter_map(|n| match &n.node {
            Some(NodeEnum::DefElem(d)) => Some(&**d),
            _ => None,
        })
        .collect();
    let mut format = CopyFormat::Text;
    for element in &elements {
        if element.defname == "format" {
            format = match string_arg(element).as_deref() {
                Some("text") => CopyFormat::Text,
                Some("csv") => CopyFormat::Csv,
                other => {
                    return Err(refuse(format!(
                        "COPY in {} format",
                        other.unwrap_or("this")
                    )))
                }
            };
        }
    }
    let csv = format == CopyFormat::Csv;
    let to = !copy.is_from;
    let mut out = CopyOptions::defaults(format, names.len());
    let mut escape_set = false;
    for element in &elements {
        let name = element.defname.as_str();
        let byte = || -> Result<u8, Rejection> {
            match string_arg(element).as_deref().map(str::as_bytes) {
                Some([b]) if b.is_ascii() => Ok(*b),
                _ => Err(refuse(format!(
                    "COPY with a {} that is not a single one-byte character",
                    name.to_uppercase()
                ))),
            }
        };
        let flags = |what: &str| -> Result<Vec<bool>, Rejection> {
            if !csv {
                return Err(refuse(format!("COPY {what} outside CSV format")));
            }
            match element.arg.as_ref().and_then(|a| a.node.as_ref()) {
                Some(NodeEnum::AStar(_)) => Ok(vec![true; names.len()]),
                Some(NodeEnum::List(list)) => {
                    let mut flags = vec![false; names.len()];
                    for item in &list.items {
                        let Some(NodeEnum::String(column)) = &item.node else {
                            return Err(refuse(format!("COPY {what} of this form")));
                        };
                        let index = names.iter().position(|n| *n == column.sval).ok_or_else(|| {
                            refuse(format!(
                                "COPY {what} naming a column that is not copied (or COPY without a column list)"
                            ))
                        })?;
                        flags[index] = true;
                    }
                    Ok(flags)
                }
                _ => Err(refuse(format!("COPY {what} of this form"))),
            }
        };
        match name {
            "format" | "freeze" => {}
            "delimiter" => out.delimiter = byte()?,
            "null" => {
                out.null = string_arg(element)
                    .ok_or_else(|| refuse("COPY NULL of this form".to_owned()))?
                    .into_bytes()
            }
            "header" => {
                out.header = match bool_arg(element) {
                    Some(header) => header,
                    None => {
                        return Err(refuse(
                            "COPY HEADER MATCH (or this HEADER value)".to_owned(),
                        ))
                    }
                }
            }
            "quote" if csv => out.quote = byte()?,
            "escape" if csv => {
                escape_set = true;
                out.escape = byte()?
            }
            "force_quote" if to => {
                let star = matches!(
                    element.arg.as_ref().and_then(|a| a.node.as_ref()),
                    Some(NodeEnum::AStar(_))
                );
                out.force_quote_all = star && csv;
                out.force_quote = flags("FORCE_QUOTE")?
            }
            "force_not_null" if !to => out.force_not_null = flags("FORCE_NOT_NULL")?,
            "force_null" if !to => out.force_null = flags("FORCE_NULL")?,
            other => return Err(refuse(format!("COPY with option {}", other.to_uppercase()))),
        }
    }
    if !escape_set {
        out.escape = out.quote;
    }
    out.validate().map_err(|e| Rejection {
        sqlstate: e.sqlstate,
        table: Some(table.to_owned()),
        column: None,
        message: e.message,
    })?;
    Ok(out)
}

/// A DefElem's argument as a string (`String`, or a number written bare).
fn string_arg(element: &DefElem) -> Option<String> {
    match element.arg.as_ref()?.node.as_ref()? {
        NodeEnum::String(s) => Some(s.sval.clone()),
        NodeEnum::Integer(i) => Some(i.ival.to_string()),
        NodeEnum::Float(f) => Some(f.fval.clone()),
        _ => None,
    }
}

/// A boolean option as PostgreSQL's `defGetBoolean` reads it (no argument
/// is true); `None` for anything else (HEADER MATCH included).
fn bool_arg(element: &DefElem) -> Option<bool> {
    let Some(arg) = element.arg.as_ref() else {
        return Some(true);
    };
    match arg.node.as_ref()? {
        NodeEnum::Boolean(b) => Some(b.boolval),
        NodeEnum::Integer(i) => match i.ival {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        },
        NodeEnum::String(s) => match s.sval.to_lowercase().as_str() {
            "true" | "on" => Some(true),
            "false" | "off" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_policy;
    use crate::rewrite::{analyze, StatementPlan, KM003};

    fn policy() -> Policy {
        parse_policy(
            "tables:\n  public.patients:\n    tenant_column: tenant_id\n    columns:\n      ssn: {type: text, search: equality}\n      birth_date: {type: date}\n      notes: {type: text}\n",
            "test",
        )
        .unwrap()
    }

    fn plan(sql: &str) -> Result<CopyPlan, Rejection> {
        match analyze(&policy(), sql, 0)?.statements.into_iter().next() {
            Some(StatementPlan::Copy(plan)) => Ok(*plan),
            other => panic!("{sql}: expected a COPY plan, got {other:?}"),
        }
    }

    #[test]
    fn copy_from_sends_the_cells_edek_and_blind_indexes_upstream() {
        let Ok(CopyPlan::In(plan)) = plan(
            "COPY patients (id, tenant_id, ssn, notes, cmk_edek, ssn_bidx) FROM STDIN WITH (FORMAT csv, HEADER, FORCE_NULL (notes))",
        ) else {
            panic!("expected COPY FROM");
        };
        assert_eq!(
            plan.upstream_sql,
            "COPY \"public\".\"patients\" (\"id\", \"tenant_id\", \"ssn\", \"notes\", \"cmk_edek\", \"ssn_bidx\") FROM STDIN"
        );
        assert_eq!(plan.roles[1], CopyFieldRole::Tenant);
        assert_eq!(plan.roles[4], CopyFieldRole::Ignored);
        assert_eq!(plan.roles[5], CopyFieldRole::Ignored);
        assert!(matches!(
            &plan.roles[2],
            CopyFieldRole::Protected {
                searchable: true,
                ..
            }
        ));
        assert_eq!(plan.options.format, CopyFormat::Csv);
        assert!(plan.options.header);
        assert_eq!(
            plan.options.force_null,
            vec![false, false, false, true, false, false]
        );
        assert_eq!(plan.shown_table, "patients");
    }

    #[test]
    fn copy_to_runs_the_select_of_its_columns() {
        let sql = "COPY public.patients (id, ssn) TO STDOUT (FORMAT csv, DELIMITER ';')";
        let Ok(CopyPlan::Out(out)) = plan(sql) else {
            panic!("expected COPY TO: {:?}", plan(sql));
        };
        // The read analysis adds the row tenant (hidden from the client).
        assert!(
            out.select_sql.starts_with("SELECT \"id\", \"ssn\", ")
                && out.select_sql.ends_with(" FROM \"public\".\"patients\""),
            "{}",
            out.select_sql
        );
        assert_eq!(out.options.delimiter, b';');
        let Ok(CopyPlan::Out(out)) = plan("COPY (SELECT ssn FROM patients WHERE id = 1) TO STDOUT")
        else {
            panic!("expected COPY TO");
        };
        assert!(
            out.select_sql.starts_with("SELECT ssn"),
            "{}",
            out.select_sql
        );
        // pg_dump names every column: the EDEK and blind index print NULL.
        let sql = "COPY public.patients (id, tenant_id, ssn, ssn_bidx, birth_date, notes, cmk_edek) TO stdout;";
        let Ok(CopyPlan::Out(out)) = plan(sql) else {
            panic!("expected COPY TO");
        };
        assert!(
            out.select_sql
                .contains("NULL AS \"ssn_bidx\", \"birth_date\", \"notes\", NULL AS \"cmk_edek\""),
            "{}",
            out.select_sql
        );
    }

    #[test]
    fn copy_forms_the_proxy_cannot_reproduce_are_refused_before_any_data() {
        for sql in [
            "COPY patients FROM STDIN",
            "COPY patients (id, ssn) FROM STDIN (FORMAT binary)",
            "COPY patients (id, ssn) FROM STDIN BINARY",
            "COPY patients (id, ssn) FROM STDIN (ENCODING 'LATIN1')",
            "COPY patients (id, ssn) FROM '/tmp/data'",
            "COPY patients (id, ssn) TO PROGRAM 'cat'",
            "COPY patients (id, ssn) FROM STDIN (FORMAT csv, FORCE_NULL (other))",
            "COPY patients (id, ssn) FROM STDIN (FORCE_NULL (ssn))",
        ] {
            let refusal = plan(sql).unwrap_err();
            assert_eq!(refusal.sqlstate, KM003, "{sql}: {}", refusal.message);
        }
        // PostgreSQL's own checks of the options, with its SQLSTATE.
        let refusal = plan("COPY patients (id, ssn) FROM STDIN (DELIMITER '\\')").unwrap_err();
        assert_eq!(refusal.sqlstate, "22023");
    }
}
