//! WITH clauses and the writes (INSERT, UPDATE, DELETE): their queries,
//! conditions, SET values and RETURNING lists.

use serde_json::Value;

use super::columns::Columns;
use super::tree::{field, kind, list, names, text};
use super::{refuse, Step, Top, Walk, ALIAS_LIST};

impl Walk<'_, '_> {
    /// The CTEs of a WITH clause, each visible to the ones after it (and,
    /// when recursive, to itself: its columns are read until they settle).
    pub(super) fn with_clause(&mut self, with: &Value) -> Step {
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
    pub(super) fn cte_query(&mut self, query: &Value) -> Step<Columns> {
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
    pub(super) fn insert(&mut self, insert: &Value) -> Step {
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

    pub(super) fn update(&mut self, update: &Value) -> Step {
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

    pub(super) fn delete(&mut self, delete: &Value) -> Step {
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
    pub(super) fn range_var(&mut self, range_var: &Value) -> Step {
        let columns = self.relation_columns(range_var);
        let tenant = self.row_tenant(range_var);
        let name = text(range_var, "relname").to_owned();
        self.add_with_tenant(range_var, name, columns, tenant)
    }

    /// SET values: a protected column's value is the write planner's (it
    /// is sealed or refused there); any other value must not read one.
    pub(super) fn assignments(&mut self, targets: &[Value], relation: &Value) -> Step {
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

    /// A RETURNING list; the statement's own (of an UPDATE or DELETE) is
    /// what the client gets, like a SELECT's result.
    pub(super) fn returning(&mut self, statement: &Value) -> Step {
        let exprs = list(field(statement, "returning_clause"), "exprs");
        let columns = self.target_list(exprs)?;
        if std::mem::take(&mut self.top_returning) {
            self.top = Some(Top {
                columns,
                relations: self.levels.last().cloned().unwrap_or_default(),
            });
        }
        Ok(())
    }
}
