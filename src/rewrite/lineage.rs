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

use serde_json::{Map, Value};

use super::analyze::Scope;
use super::names::keys_named;
use super::Rejection;

/// Where a protected value comes from: a policy table's (or a protected
/// view's) column, and the relation of the query at hand that delivers it.
#[derive(Debug, Clone)]
struct Origin {
    table: String,
    column: String,
    /// The id of the relation it was last read from.
    via: usize,
}

impl PartialEq for Origin {
    fn eq(&self, other: &Self) -> bool {
        self.table == other.table && self.column == other.column
    }
}

impl Eq for Origin {}

/// The columns a relation (a table, view, CTE, subquery or join) shows to
/// the query that reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Columns {
    /// Every column in order, with the origin of those that carry a
    /// protected value (subqueries and CTEs whose target lists are known).
    Ordered(Vec<(String, Option<Origin>)>),
    /// Only the protected columns are known, by name; their positions and
    /// the other columns' names are not (tables, views, `SELECT *` of them).
    Named(Vec<(String, Origin)>),
}

/// What a column name means in one relation.
enum Lookup {
    /// A column that carries a protected value.
    Protected(Origin),
    /// A column that carries none.
    Clean,
    /// No column of that name.
    Absent,
    /// Perhaps a column of that name that carries none, perhaps none.
    Unknown,
}

impl Columns {
    fn clean() -> Self {
        Columns::Named(Vec::new())
    }

    fn lookup(&self, name: &str) -> Lookup {
        match self {
            Columns::Ordered(columns) => {
                let mut found = Lookup::Absent;
                for (_, origin) in columns.iter().filter(|(c, _)| c == name) {
                    match origin {
                        Some(origin) => return Lookup::Protected(origin.clone()),
                        None => found = Lookup::Clean,
                    }
                }
                found
            }
            Columns::Named(columns) => match columns.iter().find(|(c, _)| c == name) {
                Some((_, origin)) => Lookup::Protected(origin.clone()),
                None => Lookup::Unknown,
            },
        }
    }

    fn protected(&self) -> Vec<&Origin> {
        match self {
            Columns::Ordered(columns) => columns.iter().filter_map(|(_, o)| o.as_ref()).collect(),
            Columns::Named(columns) => columns.iter().map(|(_, o)| o).collect(),
        }
    }

    /// The origin carried at 1-based `position`; for columns of unknown
    /// positions, any protected one (the position may be it).
    fn at(&self, position: usize) -> Option<Origin> {
        match self {
            Columns::Ordered(columns) => position
                .checked_sub(1)
                .and_then(|i| columns.get(i))
                .and_then(|(_, o)| o.clone()),
            Columns::Named(columns) => columns.first().map(|(_, o)| o.clone()),
        }
    }

    /// The columns renamed by an alias list (`AS p(a, b)`, `c(a, b) AS`):
    /// positional, so refused where positions of protected columns are
    /// not known.
    fn renamed(self, names: &[String]) -> Result<Self, Origin> {
        if names.is_empty() {
            return Ok(self);
        }
        match self {
            Columns::Ordered(mut columns) => {
                for (column, name) in columns.iter_mut().zip(names) {
                    column.0 = name.clone();
                }
                Ok(Columns::Ordered(columns))
            }
            Columns::Named(columns) => match columns.into_iter().next() {
                Some((_, origin)) => Err(origin),
                None => Ok(Columns::clean()),
            },
        }
    }

    /// The columns of several relations side by side (a join, `*`).
    fn concat(parts: Vec<Columns>) -> Self {
        if parts.iter().all(|p| matches!(p, Columns::Ordered(_))) {
            return Columns::Ordered(
                parts
                    .into_iter()
                    .flat_map(|p| match p {
                        Columns::Ordered(columns) => columns,
                        Columns::Named(_) => Vec::new(),
                    })
                    .collect(),
            );
        }
        Columns::Named(
            parts
                .into_iter()
                .flat_map(|p| match p {
                    Columns::Ordered(columns) => columns
                        .into_iter()
                        .filter_map(|(c, o)| Some((c, o?)))
                        .collect::<Vec<_>>(),
                    Columns::Named(columns) => columns,
                })
                .collect(),
        )
    }
}

/// A relation of a FROM list, under the name that qualifies its columns.
#[derive(Debug, Clone)]
struct Relation {
    id: usize,
    name: String,
    columns: Columns,
    /// Its column that names each row's tenant, when the proxy can attach
    /// it to the result (a policy table, a view that shows it).
    row_tenant: Option<String>,
}

impl Relation {
    /// `lookup`, with the origin marked as read from this relation.
    fn lookup(&self, name: &str) -> Lookup {
        match self.columns.lookup(name) {
            Lookup::Protected(origin) => Lookup::Protected(Origin {
                via: self.id,
                ..origin
            }),
            other => other,
        }
    }

    /// Its protected columns, marked as read from this relation.
    fn columns_via(&self) -> Columns {
        let via = |origin: &Origin| Origin {
            via: self.id,
            ..origin.clone()
        };
        match &self.columns {
            Columns::Ordered(columns) => Columns::Ordered(
                columns
                    .iter()
                    .map(|(c, o)| (c.clone(), o.as_ref().map(via)))
                    .collect(),
            ),
            Columns::Named(columns) => {
                Columns::Named(columns.iter().map(|(c, o)| (c.clone(), via(o))).collect())
            }
        }
    }
}

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

/// `{"node": {"Kind": body}}` (or `{"Kind": body}`): the node's kind and body.
fn kind(value: &Value) -> Option<(&str, &Value)> {
    let object = value.as_object()?;
    let inner = match object.get("node") {
        Some(node) if object.len() == 1 => node.as_object()?,
        _ => object,
    };
    let mut entries = inner.iter();
    match (entries.next(), entries.next()) {
        (Some((k, body)), None) if body.is_object() => Some((k.as_str(), body)),
        _ => None,
    }
}

fn field<'v>(body: &'v Value, name: &str) -> &'v Value {
    body.get(name).unwrap_or(&Value::Null)
}

fn list<'v>(body: &'v Value, name: &str) -> &'v [Value] {
    body.get(name)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn text<'v>(body: &'v Value, name: &str) -> &'v str {
    body.get(name).and_then(Value::as_str).unwrap_or("")
}

/// The strings of a list of `String` nodes (names).
fn names(nodes: &[Value]) -> Vec<String> {
    nodes
        .iter()
        .filter_map(|n| match kind(n) {
            Some(("String", body)) => Some(text(body, "sval").to_owned()),
            _ => None,
        })
        .collect()
}

/// The alias of a FROM item: its name and column names.
fn alias(body: &Value) -> (Option<String>, Vec<String>) {
    let alias = field(body, "alias");
    let name = Some(text(alias, "aliasname")).filter(|n| !n.is_empty());
    (name.map(str::to_owned), names(list(alias, "colnames")))
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

    /// Adds the relations of one FROM item to the current query.
    fn range_item(&mut self, item: &Value) -> Step {
        let Some((kind_name, body)) = kind(item) else {
            return Ok(());
        };
        match kind_name {
            "RangeVar" => self.range_var(body),
            "RangeSubselect" => {
                let columns = match kind(field(body, "subquery")) {
                    Some(("SelectStmt", select)) => self.query(select)?,
                    _ => Columns::clean(),
                };
                self.add(body, String::new(), columns)
            }
            "JoinExpr" => self.join(body),
            "RangeFunction" => {
                self.consume_all(list(body, "functions"))?;
                self.add(body, String::new(), Columns::clean())
            }
            "RangeTableSample" => {
                self.consume_all(list(body, "args"))?;
                self.consume(field(body, "repeatable"))?;
                self.range_item(field(body, "relation"))
            }
            // XMLTABLE, JSON_TABLE and the like: their arguments are
            // expressions, their columns carry nothing protected.
            _ => {
                self.consume(item)?;
                self.add(body, String::new(), Columns::clean())
            }
        }
    }

    /// Adds a relation under its alias (or `name`), renamed by its alias list.
    fn add(&mut self, body: &Value, name: String, columns: Columns) -> Step {
        self.add_with_tenant(body, name, columns, None)
    }

    fn add_with_tenant(
        &mut self,
        body: &Value,
        name: String,
        columns: Columns,
        row_tenant: Option<String>,
    ) -> Step {
        let (alias, colnames) = alias(body);
        let columns = columns
            .renamed(&colnames)
            .or_else(|origin| refuse(origin, ALIAS_LIST))?;
        let renamed_tenant = row_tenant.filter(|_| colnames.is_empty());
        self.next_id += 1;
        let id = self.next_id;
        if let Some(level) = self.levels.last_mut() {
            level.push(Relation {
                id,
                name: alias.unwrap_or(name),
                columns,
                row_tenant: renamed_tenant,
            });
        }
        Ok(())
    }

    /// The tenant column of a named relation: a policy table's, or the one
    /// a view over protected columns shows (not a CTE's).
    fn row_tenant(&self, range_var: &Value) -> Option<String> {
        let schema = text(range_var, "schemaname");
        let relation = text(range_var, "relname");
        if schema.is_empty() && self.ctes.iter().any(|(n, _)| n == relation) {
            return None;
        }
        let key = format!("{schema}.{relation}");
        let policy = self.scope.policy;
        let table = match schema {
            "" => keys_named(policy.tables.keys(), relation).next(),
            _ => policy.tables.get_key_value(&key).map(|(k, _)| k),
        };
        if let Some(table) = table.and_then(|t| policy.tables.get(t)) {
            return Some(table.tenant_column.clone());
        }
        let view = match schema {
            "" => keys_named(self.scope.view_tenants.keys(), relation).next(),
            _ => self.scope.view_tenants.get_key_value(&key).map(|(k, _)| k),
        };
        view.and_then(|v| self.scope.view_tenants.get(v)).cloned()
    }

    /// The columns of a named relation: a CTE, a policy table, a view over
    /// protected columns, or anything else (nothing protected).
    fn relation_columns(&self, range_var: &Value) -> Columns {
        let schema = text(range_var, "schemaname");
        let relation = text(range_var, "relname");
        if schema.is_empty() {
            if let Some((_, columns)) = self.ctes.iter().rev().find(|(n, _)| n == relation) {
                return columns.clone();
            }
        }
        let key = format!("{schema}.{relation}");
        let policy = self.scope.policy;
        let table = match schema {
            "" => keys_named(policy.tables.keys(), relation).next(),
            _ => policy.tables.get_key_value(&key).map(|(k, _)| k),
        };
        if let Some((table, table_policy)) = table.and_then(|t| policy.tables.get_key_value(t)) {
            return Columns::Named(
                table_policy
                    .columns
                    .keys()
                    .map(|c| (c.clone(), Origin::of(table, c)))
                    .collect(),
            );
        }
        let view = match schema {
            "" => keys_named(self.scope.views.keys(), relation).next(),
            _ => self.scope.views.get_key_value(&key).map(|(k, _)| k),
        };
        match view.and_then(|v| self.scope.views.get_key_value(v)) {
            Some((view, columns)) => Columns::Named(
                columns
                    .iter()
                    .map(|c| (c.clone(), Origin::of(view, c)))
                    .collect(),
            ),
            None => Columns::clean(),
        }
    }

    /// A join: both sides join the current query; a join on protected
    /// values (ON, USING, NATURAL) is refused.
    fn join(&mut self, join: &Value) -> Step {
        let first = self.levels.last().map_or(0, Vec::len);
        self.range_item(field(join, "larg"))?;
        let middle = self.levels.last().map_or(0, Vec::len);
        self.range_item(field(join, "rarg"))?;
        let level = self.levels.last().cloned().unwrap_or_default();
        let side = |range: std::ops::Range<usize>| {
            Columns::concat(
                level
                    .get(range)
                    .unwrap_or_default()
                    .iter()
                    .map(|r| r.columns.clone())
                    .collect(),
            )
        };
        let (left, right) = (side(first..middle), side(middle..level.len()));
        for name in names(list(join, "using_clause")) {
            for columns in [&left, &right] {
                if let Lookup::Protected(origin) = columns.lookup(&name) {
                    return refuse(origin, COMPUTED);
                }
            }
        }
        if join.get("is_natural").and_then(Value::as_bool) == Some(true) {
            let common = match (&left, &right) {
                (Columns::Ordered(l), Columns::Ordered(r)) => l
                    .iter()
                    .chain(r)
                    .filter(|(name, _)| {
                        l.iter().any(|(n, _)| n == name) && r.iter().any(|(n, _)| n == name)
                    })
                    .find_map(|(_, o)| o.clone()),
                // Which names the sides share is not known.
                _ => left
                    .protected()
                    .into_iter()
                    .chain(right.protected())
                    .next()
                    .cloned(),
            };
            if let Some(origin) = common {
                return refuse(origin, NATURAL);
            }
        }
        self.consume(field(join, "quals"))?;
        let merges = !list(join, "using_clause").is_empty()
            || join.get("is_natural").and_then(Value::as_bool) == Some(true);
        if field(join, "alias").is_object() {
            // An aliased join hides its sides' names behind its own.
            if let Some(level) = self.levels.last_mut() {
                level.truncate(first);
            }
            let columns = Columns::concat(vec![left, right]);
            return self.add(join, String::new(), forget_positions(columns, merges));
        }
        if merges {
            // USING and NATURAL merge columns: `*` positions shift.
            if let Some(level) = self.levels.last_mut() {
                for relation in level.iter_mut().skip(first) {
                    let columns = std::mem::replace(&mut relation.columns, Columns::clean());
                    relation.columns = forget_positions(columns, true);
                }
            }
        }
        Ok(())
    }

    /// The CTEs of a WITH clause, each visible to the ones after it (and,
    /// when recursive, to itself: its columns are read until they settle).
    fn with_clause(&mut self, with: &Value) -> Step {
        let recursive = with.get("recursive").and_then(Value::as_bool) == Some(true);
        for cte in list(with, "ctes") {
            let Some(("CommonTableExpr", cte)) = kind(cte) else {
                continue;
            };
            let name = text(cte, "ctename").to_owned();
            let colnames = names(list(cte, "aliascolnames"));
            let mut columns = Columns::clean();
            for _ in 0..4 {
                if recursive {
                    self.ctes.push((name.clone(), columns.clone()));
                }
                let read = self.cte_query(field(cte, "ctequery"));
                if recursive {
                    self.ctes.pop();
                }
                let read = read?
                    .renamed(&colnames)
                    .or_else(|origin| refuse(origin, ALIAS_LIST))?;
                let settled = read == columns;
                columns = read;
                if !recursive || settled {
                    break;
                }
            }
            self.ctes.push((name, columns));
        }
        Ok(())
    }

    /// The columns of a CTE's query (a query, or a write's RETURNING).
    fn cte_query(&mut self, query: &Value) -> Step<Columns> {
        match kind(query) {
            Some(("SelectStmt", select)) => self.query(select),
            Some(("InsertStmt" | "UpdateStmt" | "DeleteStmt", _)) => {
                self.statement(query)?;
                // A write in a WITH over protected data is refused by the
                // planner; its RETURNING is taken to carry nothing here.
                Ok(Columns::clean())
            }
            _ => Ok(Columns::clean()),
        }
    }

    /// `INSERT`: its query may hand bare columns on (as a plain read may);
    /// ON CONFLICT conditions and RETURNING are read against the target.
    fn insert(&mut self, insert: &Value) -> Step {
        let ctes = self.ctes.len();
        self.with_clause(field(insert, "with_clause"))?;
        if let Some(("SelectStmt", select)) = kind(field(insert, "select_stmt")) {
            self.query(select)?;
        }
        let target = field(insert, "relation");
        self.levels.push(Vec::new());
        let columns = self.relation_columns(target);
        let done = self
            .add(target, text(target, "relname").to_owned(), columns.clone())
            .and_then(|()| {
                self.add(&Value::Null, "excluded".to_owned(), columns)?;
                let conflict = field(insert, "on_conflict_clause");
                self.consume(field(conflict, "where_clause"))?;
                self.assignments(list(conflict, "target_list"), target)?;
                self.returning(insert)
            });
        self.levels.pop();
        self.ctes.truncate(ctes);
        done
    }

    fn update(&mut self, update: &Value) -> Step {
        let ctes = self.ctes.len();
        self.with_clause(field(update, "with_clause"))?;
        self.levels.push(Vec::new());
        let target = field(update, "relation");
        let done = self.range_var(target).and_then(|()| {
            for item in list(update, "from_clause") {
                self.range_item(item)?;
            }
            self.consume(field(update, "where_clause"))?;
            self.assignments(list(update, "target_list"), target)?;
            self.returning(update)
        });
        self.levels.pop();
        self.ctes.truncate(ctes);
        done
    }

    fn delete(&mut self, delete: &Value) -> Step {
        let ctes = self.ctes.len();
        self.with_clause(field(delete, "with_clause"))?;
        self.levels.push(Vec::new());
        let done = self.range_var(field(delete, "relation")).and_then(|()| {
            for item in list(delete, "using_clause") {
                self.range_item(item)?;
            }
            self.consume(field(delete, "where_clause"))?;
            self.returning(delete)
        });
        self.levels.pop();
        self.ctes.truncate(ctes);
        done
    }

    /// A named relation of a FROM list, or the target of an UPDATE or
    /// DELETE (a RangeVar, not wrapped in a node).
    fn range_var(&mut self, range_var: &Value) -> Step {
        let columns = self.relation_columns(range_var);
        let tenant = self.row_tenant(range_var);
        let name = text(range_var, "relname").to_owned();
        self.add_with_tenant(range_var, name, columns, tenant)
    }

    /// SET values: a protected column's value is the write planner's (it
    /// is sealed or refused there); any other value must not read one.
    fn assignments(&mut self, targets: &[Value], relation: &Value) -> Step {
        let protected = match self.relation_columns(relation) {
            Columns::Named(columns) => columns.into_iter().map(|(c, _)| c).collect(),
            Columns::Ordered(_) => Vec::new(),
        };
        for target in targets {
            let Some(("ResTarget", target)) = kind(target) else {
                self.consume(target)?;
                continue;
            };
            let value = field(target, "val");
            let bare = matches!(kind(value), Some(("ParamRef" | "AConst" | "ColumnRef", _)));
            if bare && protected.iter().any(|c| c == text(target, "name")) {
                continue;
            }
            self.consume(value)?;
            self.consume_all(list(target, "indirection"))?;
        }
        Ok(())
    }

    fn returning(&mut self, statement: &Value) -> Step {
        let exprs = list(field(statement, "returning_clause"), "exprs");
        self.target_list(exprs).map(drop)
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

/// The columns with their positions forgotten (`merged`: some were merged).
fn forget_positions(columns: Columns, merged: bool) -> Columns {
    match columns {
        Columns::Ordered(columns) if merged => Columns::Named(
            columns
                .into_iter()
                .filter_map(|(c, o)| Some((c, o?)))
                .collect(),
        ),
        other => other,
    }
}

impl Origin {
    fn of(table: &str, column: &str) -> Self {
        Self {
            table: table.to_owned(),
            column: column.to_owned(),
            via: 0,
        }
    }
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
