//! FROM lists: the relations a query reads (tables, views, CTEs,
//! subqueries, functions, joins), under the names that qualify them.

use serde_json::Value;

use super::columns::{forget_positions, Columns, Lookup, Origin, Relation};
use super::tree::{alias, field, kind, list, names, text};
use super::{refuse, Step, Walk, ALIAS_LIST, COMPUTED, NATURAL};
use crate::rewrite::names::keys_named;

impl Walk<'_, '_> {
    /// Adds the relations of one FROM item to the current query.
    pub(super) fn range_item(&mut self, item: &Value) -> Step {
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
    pub(super) fn add(&mut self, body: &Value, name: String, columns: Columns) -> Step {
        self.add_with_tenant(body, name, columns, None)
    }

    pub(super) fn add_with_tenant(
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
    pub(super) fn row_tenant(&self, range_var: &Value) -> Option<String> {
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
    pub(super) fn relation_columns(&self, range_var: &Value) -> Columns {
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
    pub(super) fn join(&mut self, join: &Value) -> Step {
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
}
