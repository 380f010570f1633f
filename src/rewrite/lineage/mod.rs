//! The lineage of protected values through a statement, read from
//! PostgreSQL's own parse tree (libpg_query, as JSON: every node kind is
//! walked, none is skipped by omission). A value that comes from a
//! protected column keeps its origin through CTE and subquery aliases,
//! column-alias lists, joins and set operations; it may leave a query only
//! as a bare column (which the session decrypts from RowDescription's
//! table OID and column number). Any function, cast, operator, condition,
//! join condition, ordering or grouping on it, and any whole-row use of a
//! relation that holds it, is refused (KM003), whatever it is named. Where
//! the proxy cannot tell which column a name or position means, it refuses.
//! Knows parse trees and the policy; nothing of sockets or keys.

mod columns;
mod from;
mod statements;
mod tree;

use serde_json::{Map, Value};

use self::columns::{Columns, Lookup, Origin, Relation};
use self::tree::{field, kind, list, names, text};
use super::analyze::Scope;
use super::Rejection;

/// The column the proxy adds to a read so that each protected cell is
/// opened only in a row of its own tenant: `qualifier.column`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RowTenantColumn {
    /// The relation's name in the query (its alias, else its name).
    pub(crate) qualifier: String,
    /// Its tenant column.
    pub(crate) column: String,
}

/// The outermost query's result and FROM list.
struct Top {
    columns: Columns,
    relations: Vec<Relation>,
}

/// What a column reference means.
enum Resolved {
    Value(Option<Origin>),
    /// The whole row of a relation that holds protected values.
    WholeRow(Origin),
}

/// The walk over one statement.
struct Walk<'s, 'p> {
    scope: &'s Scope<'p>,
    /// FROM lists of the enclosing queries, innermost last.
    levels: Vec<Vec<Relation>>,
    /// CTEs in scope, innermost last.
    ctes: Vec<(String, Columns)>,
    /// Ids for relations.
    next_id: usize,
    /// The next query read is the statement's outermost SELECT.
    top_pending: bool,
    /// The statement is an UPDATE or DELETE whose RETURNING list the
    /// client gets.
    top_returning: bool,
    /// What the outermost SELECT returns to the client (not SELECT INTO).
    top: Option<Top>,
}

/// Refuses statement `tree` (a parse tree node as JSON) when a value
/// derived from a protected column is used otherwise than as a bare column.
/// For a SELECT that returns protected columns, the tenant columns of the
/// relations they come from, for the proxy to add to the result (hidden
/// from the client); a protected column from a relation without one (a
/// CTE, a subquery, a set operation, a view that does not show it) is
/// refused: its rows' tenant cannot be checked.
pub(super) fn check(scope: &Scope<'_>, tree: &Value) -> Result<Vec<RowTenantColumn>, Rejection> {
    let mut walk = Walk {
        scope,
        levels: Vec::new(),
        ctes: Vec::new(),
        next_id: 0,
        top_pending: matches!(kind(tree), Some(("SelectStmt", _))),
        top_returning: matches!(kind(tree), Some(("UpdateStmt" | "DeleteStmt", _))),
        top: None,
    };
    walk.statement(tree).map_err(Refusal::rejection)?;
    let Some(top) = walk.top else {
        return Ok(Vec::new());
    };
    let mut attached: Vec<RowTenantColumn> = Vec::new();
    let mut read_from: Vec<(&str, usize)> = Vec::new();
    for origin in top.columns.protected() {
        // Two rows of one table in one result row: the cells of each
        // cannot be told apart to check them against their own row.
        if read_from
            .iter()
            .any(|(table, via)| *table == origin.table && *via != origin.via)
        {
            return Err(Refusal {
                origin: origin.clone(),
                what: SELF_JOIN,
            }
            .rejection());
        }
        read_from.push((&origin.table, origin.via));
        let relation = top.relations.iter().find(|r| r.id == origin.via);
        let Some((relation, column)) =
            relation.and_then(|r| r.row_tenant.as_ref().map(|column| (r, column)))
        else {
            return Err(Refusal {
                origin: origin.clone(),
                what: UNATTACHED,
            }
            .rejection());
        };
        let wanted = RowTenantColumn {
            qualifier: relation.name.clone(),
            column: column.clone(),
        };
        if !attached.contains(&wanted) {
            attached.push(wanted);
        }
    }
    Ok(attached)
}

/// Why a statement is refused, with the protected column involved.
struct Refusal {
    origin: Origin,
    what: &'static str,
}

impl Refusal {
    fn rejection(self) -> Rejection {
        Rejection::unsupported(&self.origin.table, Some(&self.origin.column), self.what)
    }
}

const COMPUTED: &str = "a function, cast, operator, condition, join condition, ordering or \
     grouping on a value derived from it (through any alias; only the bare column can be \
     decrypted)";
const WHOLE_ROW: &str = "a whole-row reference to a relation that holds it (the row as one value)";
const ALIAS_LIST: &str =
    "a column alias list over a relation that holds it (the proxy does not know its position)";
const UNATTACHED: &str = "returning it through a CTE, subquery, set operation, aliased join or \
     view without the tenant column (the proxy checks each cell against its row's tenant; select \
     it from its table or from a view that shows the tenant column)";
const SELF_JOIN: &str = "returning it from two rows of its table at once (a self-join: the proxy \
     checks each cell against its own row's tenant, and cannot tell them apart)";
const NATURAL: &str = "NATURAL JOIN of a relation that holds it (a join condition on ciphertext)";

type Step<T = ()> = Result<T, Refusal>;

fn refuse<T>(origin: Origin, what: &'static str) -> Step<T> {
    Err(Refusal { origin, what })
}

impl Walk<'_, '_> {
    fn statement(&mut self, tree: &Value) -> Step {
        let Some((kind, body)) = kind(tree) else {
            return Ok(());
        };
        match kind {
            "SelectStmt" => self.query(body).map(drop),
            "InsertStmt" => self.insert(body),
            "UpdateStmt" => self.update(body),
            "DeleteStmt" => self.delete(body),
            // The query of a view, a CREATE TABLE … AS, a cursor, a
            // PREPARE, an EXPLAIN or a COPY is read like any query.
            "ViewStmt" | "CreateTableAsStmt" | "DeclareCursorStmt" | "PrepareStmt"
            | "ExplainStmt" | "CopyStmt" => self.statement(field(body, "query")),
            _ => Ok(()),
        }
    }

    /// A query's result columns, after refusing every use of a protected
    /// value in it other than as a bare column of its target list.
    fn query(&mut self, select: &Value) -> Step<Columns> {
        let top = std::mem::take(&mut self.top_pending);
        let ctes = self.ctes.len();
        self.with_clause(field(select, "with_clause"))?;
        let columns = self.query_body(select, top);
        self.ctes.truncate(ctes);
        columns
    }

    /// `top`: the statement's outermost query, whose result the client gets.
    fn query_body(&mut self, select: &Value, top: bool) -> Step<Columns> {
        // SetOperation: 0 undefined, 1 none, 2 union, 3 intersect, 4 except.
        let op = select.get("op").and_then(Value::as_i64).unwrap_or(1);
        if op > 1 {
            let left = self.query(field(select, "larg"))?;
            let right = self.query(field(select, "rarg"))?;
            let columns = match (left, right) {
                (Columns::Ordered(mut l), Columns::Ordered(r)) => {
                    for (i, (_, origin)) in l.iter_mut().enumerate() {
                        if origin.is_none() {
                            *origin = r.get(i).and_then(|(_, o)| o.clone());
                        }
                    }
                    Columns::Ordered(l)
                }
                (l, r) => Columns::concat(vec![l, r]),
            };
            self.levels.push(Vec::new());
            let done = self.ordering(select, &columns);
            self.levels.pop();
            done?;
            if top {
                self.top = Some(Top {
                    columns: columns.clone(),
                    relations: Vec::new(),
                });
            }
            return Ok(columns);
        }
        let values = list(select, "values_lists");
        if !values.is_empty() {
            self.consume_all(values)?;
            let width = values
                .first()
                .and_then(|row| kind(row).map(|(_, b)| list(b, "items").len()))
                .unwrap_or(0);
            let columns = (1..=width)
                .map(|i| (format!("column{i}"), None))
                .collect::<Vec<_>>();
            return Ok(Columns::Ordered(columns));
        }
        self.levels.push(Vec::new());
        let columns = self.select(select);
        let relations = self.levels.pop().unwrap_or_default();
        let into = field(select, "into_clause").is_object();
        if let (true, false, Ok(columns)) = (top, into, &columns) {
            self.top = Some(Top {
                columns: columns.clone(),
                relations,
            });
        }
        columns
    }

    fn select(&mut self, select: &Value) -> Step<Columns> {
        for item in list(select, "from_clause") {
            self.range_item(item)?;
        }
        self.consume(field(select, "where_clause"))?;
        let columns = self.target_list(list(select, "target_list"))?;
        for item in list(select, "group_clause") {
            self.by_output(item, &columns)?;
        }
        self.consume(field(select, "having_clause"))?;
        self.consume_all(list(select, "window_clause"))?;
        // `DISTINCT` alone is one empty node; `DISTINCT ON (…)` compares.
        for item in list(select, "distinct_clause") {
            if kind(item).is_some() {
                self.by_output(item, &columns)?;
            }
        }
        self.ordering(select, &columns)?;
        Ok(columns)
    }

    /// ORDER BY, LIMIT and OFFSET of a query with result `columns`.
    fn ordering(&mut self, select: &Value, columns: &Columns) -> Step {
        for item in list(select, "sort_clause") {
            match kind(item) {
                Some(("SortBy", body)) => {
                    self.by_output(field(body, "node"), columns)?;
                    self.consume(field(body, "use_op"))?;
                }
                _ => self.consume(item)?,
            }
        }
        self.consume(field(select, "limit_offset"))?;
        self.consume(field(select, "limit_count"))
    }

    /// An ORDER BY, GROUP BY or DISTINCT ON item: a position or a bare
    /// name may mean a result column, else it is an expression.
    fn by_output(&mut self, item: &Value, columns: &Columns) -> Step {
        match kind(item) {
            Some(("AConst", body)) => {
                let position = field(body, "val")
                    .get("Ival")
                    .and_then(|i| i.get("ival"))
                    .and_then(Value::as_u64);
                if let Some(position) = position {
                    let position = usize::try_from(position).unwrap_or(usize::MAX);
                    if let Some(origin) = columns.at(position) {
                        return refuse(origin, COMPUTED);
                    }
                }
                Ok(())
            }
            // `$n` where a literal stood (a simple query planned by its
            // shape): the literal may have been a position.
            Some(("ParamRef", _)) => match columns.protected().first() {
                Some(origin) => refuse((*origin).clone(), COMPUTED),
                None => Ok(()),
            },
            Some(("ColumnRef", body)) => {
                if let [name] = names(list(body, "fields")).as_slice() {
                    if let Lookup::Protected(origin) = columns.lookup(name) {
                        return refuse(origin, COMPUTED);
                    }
                }
                self.consume(item)
            }
            _ => self.consume(item),
        }
    }

    /// The columns a target list yields; bare columns keep their origin.
    fn target_list(&mut self, targets: &[Value]) -> Step<Columns> {
        let mut parts = Vec::new();
        let mut current = Vec::new();
        for target in targets {
            let Some(("ResTarget", target)) = kind(target) else {
                self.consume(target)?;
                continue;
            };
            let value = field(target, "val");
            let alias = Some(text(target, "name")).filter(|n| !n.is_empty());
            match kind(value) {
                Some(("ColumnRef", reference)) => {
                    let fields = list(reference, "fields");
                    if fields
                        .last()
                        .is_some_and(|f| matches!(kind(f), Some(("AStar", _))))
                    {
                        parts.push(Columns::Ordered(std::mem::take(&mut current)));
                        parts.push(self.star(&names(fields)));
                        continue;
                    }
                    let origin = match self.resolve(reference) {
                        Resolved::Value(origin) => origin,
                        Resolved::WholeRow(origin) => return refuse(origin, WHOLE_ROW),
                    };
                    let name = alias
                        .map(str::to_owned)
                        .or_else(|| names(fields).pop())
                        .unwrap_or_default();
                    current.push((name, origin));
                }
                _ => {
                    self.consume(value)?;
                    let name = alias.unwrap_or("?column?").to_owned();
                    current.push((name, None));
                }
            }
        }
        parts.push(Columns::Ordered(current));
        Ok(Columns::concat(parts))
    }

    /// The columns `*` or `r.*` expands to.
    fn star(&self, qualifier: &[String]) -> Columns {
        let Some(level) = self.levels.last() else {
            return Columns::clean();
        };
        let columns = level
            .iter()
            .filter(|r| qualifier.last().is_none_or(|q| r.name == *q))
            .map(Relation::columns_via)
            .collect();
        Columns::concat(columns)
    }

    /// What a column reference means, innermost query first.
    fn resolve(&self, reference: &Value) -> Resolved {
        let fields = list(reference, "fields");
        let star = fields
            .last()
            .is_some_and(|f| matches!(kind(f), Some(("AStar", _))));
        let parts = names(fields);
        if star {
            // `r.*` outside a target list: the row as one value.
            let rows = self.levels.iter().rev().flatten();
            let origin = rows
                .filter(|r| parts.last().is_none_or(|q| r.name == *q))
                .find_map(|r| r.columns.protected().first().map(|o| (*o).clone()));
            return match origin {
                Some(origin) => Resolved::WholeRow(origin),
                None => Resolved::Value(None),
            };
        }
        match parts.as_slice() {
            [] => Resolved::Value(None),
            [name] => self.resolve_bare(name),
            [.., relation, column] => {
                for level in self.levels.iter().rev() {
                    if let Some(r) = level.iter().find(|r| r.name == *relation) {
                        return match r.lookup(column) {
                            Lookup::Protected(origin) => Resolved::Value(Some(origin)),
                            _ => Resolved::Value(None),
                        };
                    }
                }
                Resolved::Value(None)
            }
        }
    }

    /// An unqualified name: a column of the innermost query that has one
    /// of that name, else (when no relation can have it) of an outer one;
    /// or the whole row of a relation of that name.
    fn resolve_bare(&self, name: &str) -> Resolved {
        for level in self.levels.iter().rev() {
            let mut clean = false;
            for relation in level {
                match relation.lookup(name) {
                    Lookup::Protected(origin) => return Resolved::Value(Some(origin)),
                    Lookup::Clean => clean = true,
                    Lookup::Absent | Lookup::Unknown => {}
                }
            }
            if clean {
                return Resolved::Value(None);
            }
            let row = level
                .iter()
                .filter(|r| r.name == name)
                .find_map(|r| r.columns.protected().first().map(|o| (*o).clone()));
            if let Some(origin) = row {
                return Resolved::WholeRow(origin);
            }
        }
        Resolved::Value(None)
    }

    fn consume_all(&mut self, values: &[Value]) -> Step {
        values.iter().try_for_each(|v| self.consume(v))
    }

    /// An expression whose value is computed on, compared or returned as
    /// something other than a bare column: no protected value may flow
    /// into it. Every node kind is walked (the JSON holds all fields).
    fn consume(&mut self, value: &Value) -> Step {
        match value {
            Value::Array(items) => self.consume_all(items),
            Value::Object(object) => {
                if let Some((kind_name, body)) = kind(value) {
                    match kind_name {
                        "ColumnRef" => {
                            return match self.resolve(body) {
                                Resolved::Value(None) => Ok(()),
                                Resolved::Value(Some(origin)) => refuse(origin, COMPUTED),
                                Resolved::WholeRow(origin) => refuse(origin, WHOLE_ROW),
                            };
                        }
                        // `col IS [NOT] NULL`: null-ness is visible anyway
                        // (a NULL value is a NULL cell).
                        "NullTest" if is_bare_column(field(body, "arg")) => {
                            let reference = kind(field(body, "arg")).map(|(_, r)| r);
                            return match reference.map(|r| self.resolve(r)) {
                                Some(Resolved::WholeRow(origin)) => refuse(origin, WHOLE_ROW),
                                _ => Ok(()),
                            };
                        }
                        "SubLink" => return self.sublink(body),
                        "SelectStmt" => {
                            let columns = self.query(body)?;
                            return match columns.protected().first() {
                                Some(origin) => refuse((*origin).clone(), COMPUTED),
                                None => Ok(()),
                            };
                        }
                        "FuncCall" if is_plain_count(body) => {
                            self.consume(field(body, "agg_filter"))?;
                            return self.consume(field(body, "over"));
                        }
                        _ => {}
                    }
                }
                self.consume_fields(object)
            }
            _ => Ok(()),
        }
    }

    fn consume_fields(&mut self, object: &Map<String, Value>) -> Step {
        object.values().try_for_each(|v| self.consume(v))
    }

    /// A subquery in an expression: its rows are read with the enclosing
    /// queries in scope; whatever it yields is compared or computed on
    /// (EXISTS yields nothing).
    fn sublink(&mut self, sublink: &Value) -> Step {
        const EXISTS: i64 = 1;
        self.consume(field(sublink, "testexpr"))?;
        let columns = match kind(field(sublink, "subselect")) {
            Some(("SelectStmt", select)) => self.query(select)?,
            _ => Columns::clean(),
        };
        let exists = sublink.get("sub_link_type").and_then(Value::as_i64) == Some(EXISTS);
        match columns.protected().first() {
            Some(origin) if !exists => refuse((*origin).clone(), COMPUTED),
            _ => Ok(()),
        }
    }
}

fn is_bare_column(node: &Value) -> bool {
    matches!(kind(node), Some(("ColumnRef", _)))
}

/// `count(*)` or `count(col)`: reveals no more than null-ness, which is
/// visible anyway. `count(DISTINCT col)` compares values.
fn is_plain_count(call: &Value) -> bool {
    let name = names(list(call, "funcname"));
    let is_count = matches!(name.as_slice(), [n] | [_, n] if n == "count");
    let distinct = call.get("agg_distinct").and_then(Value::as_bool) == Some(true);
    let ordered = !list(call, "agg_order").is_empty();
    let star = call.get("agg_star").and_then(Value::as_bool) == Some(true);
    let bare_arg = match list(call, "args") {
        [arg] => matches!(kind(arg), Some(("ColumnRef", _))),
        [] => star,
        _ => false,
    };
    is_count && !distinct && !ordered && bare_arg
}
