//! `INSERT INTO t (cols…) SELECT * FROM UNNEST(a1, a2, …)`: one array per
//! column, one row per element (Django's `bulk_create` on PostgreSQL, and
//! bulk loaders that bind arrays). Each protected column's array becomes
//! an array of cells the session seals element by element, under the
//! tenant its row gets from the tenant column's array; the EDEK and
//! blind-index columns get arrays of their own.

use sqlparser::ast::{
    CastKind, DataType, Expr, Ident, Insert, Query, SelectItem, SetExpr, TableFactor,
};

use super::write::{operand, placeholder, Operand, Placeholders, WritePlan};
use super::Rejection;
use crate::config::{DeclaredType, SearchMode, TablePolicy};

/// Where an array of values comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArraySource {
    /// An array literal in the statement (its text, as `array_in` reads it).
    Literal(String),
    /// Client parameter `$n` (1-based), an array in text or binary form.
    Param(usize),
}

/// One protected column's array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArrayCells {
    /// Protected column name.
    pub column: String,
    /// Its declared plaintext type.
    pub ty: DeclaredType,
    /// Where the plaintexts come from.
    pub source: ArraySource,
    /// Placeholder carrying the array of cells (`bytea[]`).
    pub target_param: usize,
    /// Placeholder carrying the array of blind indexes, for `search: equality`.
    pub bidx_param: Option<usize>,
}

/// The arrays of an UNNEST insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnnestPlan {
    /// The tenant column's array: row `i`'s tenant is its element `i`.
    pub tenants: ArraySource,
    /// The protected columns' arrays.
    pub cells: Vec<ArrayCells>,
    /// Placeholder carrying the array of row EDEKs (`jsonb[]`).
    pub edek_param: usize,
}

/// OID of `jsonb[]`.
pub const JSONB_ARRAY_OID: u32 = 3807;

/// The plan of an UNNEST insert; `None` when `insert` has another form.
pub(super) fn plan_unnest_insert(
    table: &str,
    policy: &TablePolicy,
    insert: &mut Insert,
    columns: &[String],
    client_params: usize,
) -> Result<Option<WritePlan>, Rejection> {
    let Some(args) = insert.source.as_deref_mut().and_then(unnest_args) else {
        return Ok(None);
    };
    let refuse = |column: Option<&str>, what: &str| Rejection::unsupported(table, column, what);
    if args.len() != columns.len() {
        return Err(refuse(
            None,
            "INSERT … SELECT * FROM UNNEST(…) with another number of arrays than columns",
        ));
    }
    let Some(tenant_index) = columns.iter().position(|c| *c == policy.tenant_column) else {
        return Err(refuse(
            Some(&policy.tenant_column),
            "INSERT … SELECT * FROM UNNEST(…) without the tenant column",
        ));
    };
    let tenants = array_source(&args[tenant_index]).ok_or_else(|| {
        refuse(
            Some(&policy.tenant_column),
            "an UNNEST insert whose tenant array is not a literal or a parameter",
        )
    })?;
    let mut slots = Placeholders::after(client_params);
    let mut cells = Vec::new();
    let mut added_columns = Vec::new();
    let mut added_args = Vec::new();
    for (index, column) in columns.iter().enumerate() {
        let Some(column_policy) = policy.columns.get(column) else {
            continue;
        };
        let source = array_source(&args[index]).ok_or_else(|| {
            refuse(
                Some(column),
                "an UNNEST insert whose array is not a literal or a parameter",
            )
        })?;
        // A parameter's own number carries its cells; a literal gets one.
        let target_param = match source {
            ArraySource::Param(n) => n,
            ArraySource::Literal(_) => slots.take().0,
        };
        args[index] = array_cast(placeholder(target_param), DataType::Bytea);
        let bidx_param = (column_policy.search == SearchMode::Equality).then(|| {
            let (n, expr) = slots.take();
            added_columns.push(Ident::new(format!("{column}_bidx")));
            added_args.push(array_cast(expr, DataType::Bytea));
            n
        });
        cells.push(ArrayCells {
            column: column.clone(),
            ty: column_policy.ty,
            source,
            target_param,
            bidx_param,
        });
    }
    let (edek_param, edek) = slots.take();
    added_columns.push(Ident::new(policy.edek_column.clone()));
    added_args.push(array_cast(edek, DataType::JSONB));
    insert.columns.extend(added_columns);
    args.extend(added_args);
    let statement = sqlparser::ast::Statement::Insert(insert.clone());
    // A parameter that carries plaintexts must carry nothing else.
    let uses = super::analyze::placeholder_uses(&statement);
    if let Some(cell) = cells.iter().find(|c| {
        matches!(c.source, ArraySource::Param(_))
            && uses.iter().filter(|n| **n == c.target_param).count() > 1
    }) {
        return Err(refuse(
            Some(&cell.column),
            "a parameter used for a protected column and elsewhere in the same statement",
        ));
    }
    Ok(Some(WritePlan {
        table: table.to_owned(),
        tenant_column: policy.tenant_column.clone(),
        rows: Vec::new(),
        tenant_pin_param: None,
        extra_params: slots.added(),
        statement,
        lookups: Vec::new(),
        cleared: Vec::new(),
        hidden_results: 0,
        unnest: Some(UnnestPlan {
            tenants,
            cells,
            edek_param,
        }),
    }))
}

/// The arrays of `SELECT * FROM UNNEST(a1, …)` and nothing more (no alias
/// list, WITH ORDINALITY, WHERE, grouping, ordering or limit).
fn unnest_args(query: &mut Query) -> Option<&mut Vec<Expr>> {
    if query.with.is_some()
        || query.order_by.is_some()
        || query.limit_clause.is_some()
        || query.fetch.is_some()
    {
        return None;
    }
    let SetExpr::Select(select) = query.body.as_mut() else {
        return None;
    };
    let plain = matches!(select.projection.as_slice(), [SelectItem::Wildcard(_)])
        && select.distinct.is_none()
        && select.selection.is_none()
        && select.having.is_none()
        && matches!(&select.group_by, sqlparser::ast::GroupByExpr::Expressions(e, m) if e.is_empty() && m.is_empty())
        && select.from.len() == 1
        && select.from[0].joins.is_empty();
    if !plain {
        return None;
    }
    match &mut select.from[0].relation {
        TableFactor::UNNEST {
            alias: None,
            array_exprs,
            with_offset: false,
            with_offset_alias: None,
            with_ordinality: false,
        } => Some(array_exprs),
        _ => None,
    }
}

/// An array given as a literal (`'{a,b}'`, with any casts) or a parameter.
fn array_source(expr: &Expr) -> Option<ArraySource> {
    match operand(expr) {
        Operand::Literal(text) => Some(ArraySource::Literal(text)),
        Operand::Param(n) => Some(ArraySource::Param(n)),
        _ => None,
    }
}

/// `expr::element[]`.
pub(super) fn array_cast(expr: Expr, element: DataType) -> Expr {
    Expr::Cast {
        kind: CastKind::DoubleColon,
        expr: Box::new(expr),
        data_type: DataType::Array(sqlparser::ast::ArrayElemTypeDef::SquareBracket(
            Box::new(element),
            None,
        )),
        format: None,
    }
}
