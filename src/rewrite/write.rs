//! Planning INSERT and UPDATE on a protected table: each protected value
//! becomes a parameter slot that the session fills with ciphertext, the
//! EDEK (and blind index) columns get slots of their own, and the tenant of
//! every row is located (literal, parameter, or the session's tenant).

use sqlparser::ast::{
    Assignment, AssignmentTarget, BinaryOperator, CastKind, DataType, Expr, GroupByExpr, Ident,
    ObjectName, ObjectNamePart, OnConflictAction, OnInsert, Select, SelectItem, SetExpr, Statement,
    TableAliasColumnDef, TableFactor, Value,
};

use super::lookup::{Lookup, LookupValue};
use super::names::{ident_name, last_name};
use super::write_unnest::{UnnestPlan, JSONB_ARRAY_OID};
use super::{Rejection, KM004};
use crate::config::{DeclaredType, SearchMode, TablePolicy};

mod conflict;
mod update;

use conflict::*;
pub(crate) use update::plan_update;

/// Where a row's tenant comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantSource {
    /// A literal in the statement.
    Literal(String),
    /// Client parameter `$n` (1-based).
    Param(usize),
    /// The session's tenant (setting, startup option or user map).
    Session,
}

/// Where a protected value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueSource {
    /// A literal in the statement (its text form).
    Literal(String),
    /// Client parameter `$n` (1-based).
    Param(usize),
}

/// One protected value to encrypt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellSlot {
    /// Protected column name.
    pub column: String,
    /// Its declared plaintext type.
    pub ty: DeclaredType,
    /// Where the plaintext comes from.
    pub value: ValueSource,
    /// Placeholder number that carries the ciphertext (for `Param(n)`, `n`).
    pub target_param: usize,
    /// Placeholder number of the blind index, for `search: equality`.
    pub bidx_param: Option<usize>,
}

/// The protected values of one row (one VALUES tuple, or the SET list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowPlan {
    /// The row's tenant.
    pub tenant: TenantSource,
    /// Values to encrypt.
    pub cells: Vec<CellSlot>,
    /// Placeholder number carrying the row's EDEK JSON, if any cell is set.
    pub edek_param: Option<usize>,
}

/// A write with its placeholders; `statement` is the rewritten AST.
#[derive(Debug, Clone)]
pub struct WritePlan {
    /// `schema.table`.
    pub table: String,
    /// Tenant column of the table.
    pub tenant_column: String,
    /// Per-row slots.
    pub rows: Vec<RowPlan>,
    /// Placeholder that carries the session tenant: it pins an UPDATE to
    /// it, and names it in an INSERT that leaves the tenant column out.
    pub tenant_pin_param: Option<usize>,
    /// Placeholders the proxy added (they come after the client's own).
    pub extra_params: usize,
    /// The rewritten statement.
    pub statement: Statement,
    /// Equality lookups through the blind index (their placeholders are
    /// among the proxy's own).
    pub lookups: Vec<Lookup>,
    /// Client parameters the lookups replaced: bound as NULL.
    pub cleared: Vec<usize>,
    /// Result columns the proxy added after the client's (row tenants).
    pub hidden_results: usize,
    /// An `INSERT … SELECT * FROM UNNEST(…)`: arrays instead of rows.
    pub unnest: Option<UnnestPlan>,
}

impl WritePlan {
    /// Sets the declared type of each placeholder the proxy fills
    /// (`types[n - 1]` for `$n`): bytea for ciphertext and blind indexes,
    /// jsonb for the EDEK; the tenant pin is left to the server (0).
    pub fn declare_proxy_params(&self, types: &mut [u32]) {
        let mut declare = |n: usize, oid: u32| {
            if let Some(slot) = n.checked_sub(1).and_then(|i| types.get_mut(i)) {
                *slot = oid;
            }
        };
        for row in &self.rows {
            for cell in &row.cells {
                declare(cell.target_param, DeclaredType::Bytea.oid());
                if let Some(n) = cell.bidx_param {
                    declare(n, DeclaredType::Bytea.oid());
                }
            }
            if let Some(n) = row.edek_param {
                declare(n, DeclaredType::Jsonb.oid());
            }
        }
        for lookup in &self.lookups {
            for slot in &lookup.values {
                let oid = match slot.value {
                    LookupValue::ArrayParam(_) => BYTEA_ARRAY_OID,
                    _ => DeclaredType::Bytea.oid(),
                };
                declare(slot.index_param, oid);
            }
        }
        if let Some(unnest) = &self.unnest {
            for cells in &unnest.cells {
                declare(cells.target_param, BYTEA_ARRAY_OID);
                if let Some(n) = cells.bidx_param {
                    declare(n, BYTEA_ARRAY_OID);
                }
            }
            declare(unnest.edek_param, JSONB_ARRAY_OID);
        }
        // Unused in the SQL now: a type for the server, which gets NULL.
        for &n in &self.cleared {
            declare(n, DeclaredType::Bytea.oid());
        }
    }
}

/// OID of `bytea[]`.
pub const BYTEA_ARRAY_OID: u32 = 1001;

/// Allocates placeholder numbers after the client's own.
pub(crate) struct Placeholders {
    next: usize,
    added: usize,
}

impl Placeholders {
    pub(crate) fn after(existing: usize) -> Self {
        Self {
            next: existing + 1,
            added: 0,
        }
    }
    pub(crate) fn take(&mut self) -> (usize, Expr) {
        let n = self.next;
        self.next += 1;
        self.added += 1;
        (n, placeholder(n))
    }

    /// Placeholders taken so far.
    pub(crate) fn added(&self) -> usize {
        self.added
    }
}

pub(crate) fn placeholder(n: usize) -> Expr {
    Expr::value(Value::Placeholder(format!("${n}")))
}

pub(crate) fn param_number(text: &str) -> Option<usize> {
    text.strip_prefix('$')?.parse().ok()
}

/// The number `n` of an expression that is the placeholder `$n`.
pub(crate) fn placeholder_number(expr: &Expr) -> Option<usize> {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::Placeholder(p) => param_number(p),
            _ => None,
        },
        _ => None,
    }
}

/// A literal's text form, or `None` for NULL, `Err` for other expressions.
pub(super) enum Operand {
    Null,
    Literal(String),
    Param(usize),
    Default,
    Other,
}

pub(super) fn operand(expr: &Expr) -> Operand {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::Null => Operand::Null,
            Value::Placeholder(p) => param_number(p).map_or(Operand::Other, Operand::Param),
            Value::SingleQuotedString(s)
            | Value::EscapedStringLiteral(s)
            | Value::DollarQuotedString(sqlparser::ast::DollarQuotedString { value: s, .. }) => {
                Operand::Literal(s.clone())
            }
            Value::Number(n, _) => Operand::Literal(n.to_string()),
            Value::Boolean(b) => Operand::Literal(if *b { "t" } else { "f" }.to_owned()),
            _ => Operand::Other,
        },
        // A cast on a value only restates its type: the declared type rules.
        Expr::Cast { expr, .. } | Expr::Nested(expr) => operand(expr),
        Expr::UnaryOp {
            op: sqlparser::ast::UnaryOperator::Minus,
            expr,
        } => match operand(expr) {
            Operand::Literal(n) => Operand::Literal(format!("-{n}")),
            _ => Operand::Other,
        },
        Expr::Identifier(ident)
            if ident.quote_style.is_none() && ident.value.eq_ignore_ascii_case("default") =>
        {
            Operand::Default
        }
        _ => Operand::Other,
    }
}

pub(super) fn bytea_cast(expr: Expr) -> Expr {
    Expr::Cast {
        kind: CastKind::DoubleColon,
        expr: Box::new(expr),
        data_type: DataType::Bytea,
        format: None,
    }
}

fn jsonb_cast(expr: Expr) -> Expr {
    Expr::Cast {
        kind: CastKind::DoubleColon,
        expr: Box::new(expr),
        data_type: DataType::JSONB,
        format: None,
    }
}

fn column_ident(name: &str) -> Ident {
    Ident::new(name)
}

/// The tenant value of an expression, read as the server will store it: a
/// cast to a length-limited string type may change it
/// (`'acme-corp'::varchar(4)` is `acme`), so it makes the value unknown.
/// Other casts (`::integer`, `::uuid`, as ORMs write them) store what the
/// column's own input would.
fn tenant_operand(expr: &Expr) -> Operand {
    match expr {
        Expr::Cast {
            expr, data_type, ..
        } if keeps_text(data_type) => tenant_operand(expr),
        Expr::Nested(expr) => tenant_operand(expr),
        Expr::Cast { .. } | Expr::UnaryOp { .. } => Operand::Other,
        _ => operand(expr),
    }
}

/// False for a cast that may cut or pad a text value: `char`, `char(n)`,
/// `varchar(n)`, `name` (63 bytes).
fn keeps_text(data_type: &DataType) -> bool {
    match data_type {
        DataType::Char(_)
        | DataType::Character(_)
        | DataType::Varchar(Some(_))
        | DataType::CharacterVarying(Some(_))
        | DataType::CharVarying(Some(_))
        | DataType::Nvarchar(Some(_)) => false,
        DataType::Custom(name, _) => !matches!(
            name.to_string().to_lowercase().as_str(),
            "bpchar" | "name" | "pg_catalog.bpchar" | "pg_catalog.name"
        ),
        _ => true,
    }
}

/// True when every cast on `expr` keeps a text value as it is.
fn casts_keep_text(expr: &Expr) -> bool {
    match expr {
        Expr::Cast {
            expr, data_type, ..
        } => keeps_text(data_type) && casts_keep_text(expr),
        Expr::Nested(expr) => casts_keep_text(expr),
        _ => true,
    }
}

fn tenant_of(
    expr: Option<&Expr>,
    table: &str,
    tenant_column: &str,
) -> Result<TenantSource, Rejection> {
    match expr.map(tenant_operand) {
        None => Ok(TenantSource::Session),
        Some(Operand::Literal(t)) => Ok(TenantSource::Literal(t)),
        Some(Operand::Param(n)) => Ok(TenantSource::Param(n)),
        Some(_) => Err(Rejection {
            sqlstate: KM004,
            table: Some(table.to_owned()),
            column: Some(tenant_column.to_owned()),
            message: format!(
                "cmk-proxy: the tenant of a row written to {table} must be a literal or a parameter in {tenant_column}"
            ),
        }),
    }
}

/// An `INSERT … SELECT` list over `(VALUES …) AS v(…)`: which VALUES
/// position feeds each insert column.
struct DerivedValues {
    /// Alias column names of the VALUES list.
    aliases: Vec<String>,
    /// Insert column index → VALUES position.
    positions: Vec<usize>,
}

/// Recognizes `SELECT v.a[::type], … FROM (VALUES …) AS v(a, …)` with one
/// plain column of the VALUES list per insert column and nothing else (no
/// join, filter, grouping or DISTINCT).
fn derived_values(
    select: &Select,
    columns: &[String],
    tenant_index: Option<usize>,
) -> Option<DerivedValues> {
    let plain = select.distinct.is_none()
        && select.selection.is_none()
        && select.having.is_none()
        && matches!(&select.group_by, GroupByExpr::Expressions(e, _) if e.is_empty())
        && select.from.len() == 1
        && select.from[0].joins.is_empty()
        && select.projection.len() == columns.len();
    if !plain {
        return None;
    }
    let TableFactor::Derived {
        subquery,
        alias: Some(alias),
        lateral: false,
    } = &select.from[0].relation
    else {
        return None;
    };
    if !matches!(subquery.body.as_ref(), SetExpr::Values(_)) {
        return None;
    }
    let aliases: Vec<String> = alias.columns.iter().map(|c| ident_name(&c.name)).collect();
    let positions = select
        .projection
        .iter()
        .enumerate()
        .map(|(index, item)| {
            let expr = match item {
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
                _ => return None,
            };
            // The tenant must reach the row as written (see tenant_operand).
            if Some(index) == tenant_index && !casts_keep_text(expr) {
                return None;
            }
            let name = match strip_casts(expr) {
                Expr::Identifier(i) => ident_name(i),
                Expr::CompoundIdentifier(parts)
                    if parts.len() == 2 && ident_name(&parts[0]) == ident_name(&alias.name) =>
                {
                    ident_name(&parts[1])
                }
                _ => return None,
            };
            aliases.iter().position(|a| *a == name)
        })
        .collect::<Option<Vec<usize>>>()?;
    Some(DerivedValues { aliases, positions })
}

fn strip_casts(expr: &Expr) -> &Expr {
    match expr {
        Expr::Cast { expr, .. } | Expr::Nested(expr) => strip_casts(expr),
        other => other,
    }
}

/// Column names an ORDER BY of the query refers to.
fn order_by_names(query: &sqlparser::ast::Query) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(order_by) = &query.order_by {
        let _ = sqlparser::ast::visit_expressions(order_by, |expr| {
            match expr {
                Expr::Identifier(i) => names.push(ident_name(i)),
                Expr::CompoundIdentifier(parts) => names.extend(parts.last().map(ident_name)),
                _ => {}
            }
            std::ops::ControlFlow::<()>::Continue(())
        });
    }
    names
}

/// A parameter that carries a protected value is encrypted for exactly one
/// column: one used anywhere else too (another column, a condition, the
/// tenant) is refused, since the server would see its ciphertext there.
fn check_parameter_uses(plan: &WritePlan) -> Result<(), Rejection> {
    let uses = super::analyze::placeholder_uses(&plan.statement);
    for row in &plan.rows {
        for cell in &row.cells {
            if let ValueSource::Param(n) = cell.value {
                if uses.iter().filter(|u| **u == n).count() != 1 {
                    return Err(Rejection::unsupported(
                        &plan.table,
                        Some(&cell.column),
                        &format!("a parameter (${n}) used for a protected column and elsewhere in the same statement"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The EDEK and blind-index columns are written only by the proxy: a
/// statement that sets one itself is refused.
fn managed_column_refusal(table: &str, policy: &TablePolicy, column: &str) -> Option<Rejection> {
    let is_blind_index = column
        .strip_suffix("_bidx")
        .is_some_and(|base| policy.columns.contains_key(base));
    (column == policy.edek_column || is_blind_index).then(|| {
        Rejection::unsupported(
            table,
            Some(column),
            "writing the EDEK or blind-index column directly",
        )
    })
}

/// Plans an INSERT into a protected table. `Ok(None)`: no protected column
/// is written, nothing to do.
pub(crate) fn plan_insert(
    table: &str,
    policy: &TablePolicy,
    mut statement: Statement,
    client_params: usize,
) -> Result<Option<WritePlan>, Rejection> {
    let Statement::Insert(insert) = &mut statement else {
        return Ok(None);
    };
    let columns: Vec<String> = insert.columns.iter().map(ident_name).collect();
    if columns.is_empty() {
        return Err(Rejection::unsupported(
            table,
            None,
            "INSERT without a column list",
        ));
    }
    if let Some(refusal) = columns
        .iter()
        .find_map(|c| managed_column_refusal(table, policy, c))
    {
        return Err(refusal);
    }
    let protected: Vec<(usize, &String, DeclaredType, SearchMode)> = columns
        .iter()
        .enumerate()
        .filter_map(|(i, c)| policy.columns.get(c).map(|p| (i, c, p.ty, p.search)))
        .collect();
    if protected.is_empty() {
        // No protected value proposed: ON CONFLICT DO UPDATE may still not
        // set a protected, managed or tenant column (it would store its
        // value as written, or move the row's cells to another tenant).
        if let Some(OnInsert::OnConflict(conflict)) = &insert.on {
            if let OnConflictAction::DoUpdate(update) = &conflict.action {
                if let Some(refusal) = update.assignments.iter().find_map(|a| {
                    sealed_target_refusal(
                        table,
                        policy,
                        a,
                        "ON CONFLICT DO UPDATE of a column the INSERT does not write",
                    )
                }) {
                    return Err(refusal);
                }
            }
        }
        return Ok(None);
    }
    if let Some(plan) =
        super::write_unnest::plan_unnest_insert(table, policy, insert, &columns, client_params)?
    {
        return Ok(Some(plan));
    }
    let tenant_index = columns.iter().position(|c| *c == policy.tenant_column);
    let Some(source) = insert.source.as_mut() else {
        return Err(Rejection::unsupported(
            table,
            Some(protected[0].1),
            "INSERT without VALUES",
        ));
    };
    let insert_select = || Rejection::unsupported(table, Some(protected[0].1), "INSERT ... SELECT");
    // `INSERT … SELECT a, b FROM (VALUES …) AS v(a, b, …)` (SQLAlchemy's
    // bulk insert) is a VALUES list in disguise: planned like one.
    let derived = match source.body.as_ref() {
        SetExpr::Values(_) => None,
        SetExpr::Select(select) => {
            let derived =
                derived_values(select, &columns, tenant_index).ok_or_else(insert_select)?;
            let feeds_protected: Vec<&str> = protected
                .iter()
                .map(|p| derived.aliases[derived.positions[p.0]].as_str())
                .collect();
            if order_by_names(source)
                .iter()
                .any(|n| feeds_protected.contains(&n.as_str()))
            {
                return Err(insert_select());
            }
            Some(derived)
        }
        _ => return Err(insert_select()),
    };
    let positions: Vec<usize> = derived
        .as_ref()
        .map_or_else(|| (0..columns.len()).collect(), |d| d.positions.clone());
    let row_len = derived.as_ref().map_or(columns.len(), |d| d.aliases.len());
    let (values, projection, alias_columns) = match source.body.as_mut() {
        SetExpr::Values(values) => (values, None, None),
        SetExpr::Select(select) => {
            let Select {
                projection, from, ..
            } = select.as_mut();
            let Some(TableFactor::Derived {
                subquery,
                alias: Some(alias),
                ..
            }) = from.first_mut().map(|f| &mut f.relation)
            else {
                return Err(insert_select());
            };
            let SetExpr::Values(values) = subquery.body.as_mut() else {
                return Err(insert_select());
            };
            (values, Some(projection), Some(&mut alias.columns))
        }
        _ => return Err(insert_select()),
    };
    let mut slots = Placeholders::after(client_params);
    let mut rows = Vec::with_capacity(values.rows.len());
    let searchable: Vec<&String> = protected
        .iter()
        .filter(|p| p.3 == SearchMode::Equality)
        .map(|p| p.1)
        .collect();
    for row in values.rows.iter_mut() {
        if row.len() != row_len {
            return Err(Rejection::unsupported(
                table,
                None,
                "a VALUES row whose length differs from the column list",
            ));
        }
        let tenant = tenant_of(
            tenant_index.map(|i| &row[positions[i]]),
            table,
            &policy.tenant_column,
        )?;
        let mut cells = Vec::new();
        let mut bidx_values = Vec::new();
        for (index, column, ty, search) in &protected {
            let position = positions[*index];
            let value = match operand(&row[position]) {
                Operand::Null | Operand::Default => {
                    if *search == SearchMode::Equality {
                        bidx_values.push(Expr::value(Value::Null));
                    }
                    continue;
                }
                Operand::Literal(text) => {
                    let (n, expr) = slots.take();
                    row[position] = bytea_cast(expr);
                    (ValueSource::Literal(text), n)
                }
                Operand::Param(n) => {
                    row[position] = bytea_cast(placeholder(n));
                    (ValueSource::Param(n), n)
                }
                Operand::Other => {
                    return Err(Rejection::unsupported(
                        table,
                        Some(column),
                        "an expression as the value",
                    ));
                }
            };
            let bidx_param = (*search == SearchMode::Equality).then(|| {
                let (n, expr) = slots.take();
                bidx_values.push(bytea_cast(expr));
                n
            });
            cells.push(CellSlot {
                column: (*column).clone(),
                ty: *ty,
                value: value.0,
                target_param: value.1,
                bidx_param,
            });
        }
        let edek_param = if cells.is_empty() {
            row.push(Expr::value(Value::Null));
            None
        } else {
            let (n, expr) = slots.take();
            row.push(jsonb_cast(expr));
            Some(n)
        };
        row.extend(bidx_values);
        rows.push(RowPlan {
            tenant,
            cells,
            edek_param,
        });
    }
    // Without the tenant column the server would pick the row's tenant
    // (a DEFAULT reading the tenant setting), which may differ from the
    // tenant the proxy seals under: the proxy names it, one parameter for
    // every row.
    let tenant_pin =
        (tenant_index.is_none() && rows.iter().any(|r| !r.cells.is_empty())).then(|| slots.take());
    if let Some((_, expr)) = &tenant_pin {
        for row in values.rows.iter_mut() {
            row.push(expr.clone());
        }
    }
    if let (Some(projection), Some(alias_columns), Some(derived)) =
        (projection, alias_columns, derived.as_ref())
    {
        // Protected values pass through the SELECT list uncast (they are
        // bytea now), and the proxy's columns are added to both lists.
        for (index, ..) in &protected {
            let alias = &derived.aliases[derived.positions[*index]];
            projection[*index] = SelectItem::UnnamedExpr(Expr::Identifier(column_ident(alias)));
        }
        let added = std::iter::once(format!("{}_cmk", policy.edek_column))
            .chain(searchable.iter().map(|c| format!("{c}_bidx_cmk")))
            .chain(
                tenant_pin
                    .is_some()
                    .then(|| format!("{}_cmk", policy.tenant_column)),
            );
        for name in added {
            alias_columns.push(TableAliasColumnDef::from_name(name.as_str()));
            projection.push(SelectItem::UnnamedExpr(Expr::Identifier(column_ident(
                &name,
            ))));
        }
    }
    insert.columns.push(column_ident(&policy.edek_column));
    for column in &searchable {
        insert.columns.push(column_ident(&format!("{column}_bidx")));
    }
    if tenant_pin.is_some() {
        insert.columns.push(column_ident(&policy.tenant_column));
    }
    if let Some(OnInsert::OnConflict(conflict)) = &mut insert.on {
        if let OnConflictAction::DoUpdate(update) = &mut conflict.action {
            plan_conflict_update(table, policy, update)?;
        }
    }
    let plan = WritePlan {
        table: table.to_owned(),
        tenant_column: policy.tenant_column.clone(),
        rows,
        tenant_pin_param: tenant_pin.map(|(n, _)| n),
        extra_params: slots.added,
        statement,
        lookups: Vec::new(),
        cleared: Vec::new(),
        hidden_results: 0,
        unnest: None,
    };
    check_parameter_uses(&plan)?;
    Ok(Some(plan))
}

/// The refusal of an assignment (one column or a tuple) that sets a
/// protected, EDEK, blind-index or tenant column, where `what` is a form the
/// planner does not seal.
fn sealed_target_refusal(
    table: &str,
    policy: &TablePolicy,
    assignment: &Assignment,
    what: &str,
) -> Option<Rejection> {
    let targets: Vec<String> = match &assignment.target {
        AssignmentTarget::ColumnName(name) => last_name(name).into_iter().collect(),
        AssignmentTarget::Tuple(names) => names.iter().filter_map(last_name).collect(),
    };
    targets.iter().find_map(|column| {
        managed_column_refusal(table, policy, column).or_else(|| {
            (policy.columns.contains_key(column) || *column == policy.tenant_column)
                .then(|| Rejection::unsupported(table, Some(column), what))
        })
    })
}

fn assigned_column(assignment: &Assignment) -> Option<String> {
    match &assignment.target {
        AssignmentTarget::ColumnName(name) => last_name(name),
        AssignmentTarget::Tuple(_) => None,
    }
}
