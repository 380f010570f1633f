//! PostgreSQL's own reading of a query string (libpg_query: the server's
//! grammar and scanner, compiled in), and the check that the proxy's
//! reading agrees with it. sqlparser plans; this decides whether its plan
//! may be trusted: a statement that touches protected data passes only when
//! sqlparser's statement, printed back, is the very statement PostgreSQL
//! reads in the client's text (parse trees equal but for positions).
//! Knows SQL text and parse trees; nothing of the policy's meaning.

use pg_query::protobuf::RawStmt;
use pg_query::{NodeEnum, NodeRef};
use serde_json::Value;

/// Parse trees deeper than this are refused before any other parser sees
/// them: analysis must take bounded time whatever the client sends.
pub(crate) const MAX_DEPTH: i32 = 200;

/// What kind of statement PostgreSQL reads, as far as planning goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatementClass {
    /// A query or DML statement, or a utility the proxy does not follow.
    Plain,
    /// Changes the schema: the catalog map is reloaded after it.
    Ddl,
    /// `SHOW`, `LOCK`: touches no data, whatever it names.
    Show,
    /// A statement the proxy follows or inspects whatever it names:
    /// transaction control and savepoints, SET/RESET, DISCARD, PREPARE,
    /// EXECUTE, DEALLOCATE, COPY, DO, functions, triggers, rules, renames.
    Followed,
}

/// The parse of a whole query string by PostgreSQL's grammar, with what
/// the planner asks of it read in one walk of the tree.
pub(crate) struct PgReading {
    parsed: pg_query::ParseResult,
    classes: Vec<StatementClass>,
    depth: i32,
}

impl PgReading {
    /// PostgreSQL's reading of `sql`; `None` when its grammar rejects it.
    pub(crate) fn of(sql: &str) -> Option<Self> {
        let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).ok()?;
        let classes = parsed.protobuf.stmts.iter().map(class_of).collect();
        let depth = parsed
            .protobuf
            .nodes()
            .iter()
            .map(|(_, node_depth, _, _)| *node_depth)
            .max()
            .unwrap_or(0);
        Some(Self {
            parsed,
            classes,
            depth,
        })
    }

    /// The statements' count (an empty query string has none).
    pub(crate) fn len(&self) -> usize {
        self.classes.len()
    }

    /// The class of each statement, in order.
    pub(crate) fn classes(&self) -> &[StatementClass] {
        &self.classes
    }

    /// The deepest node of any statement's parse tree.
    pub(crate) fn depth(&self) -> i32 {
        self.depth
    }

    /// True when a relation, function or CTE that statement `index` names
    /// (its last part, decoded as PostgreSQL decodes names: `U&"…"` and
    /// quotes included) satisfies `hit`.
    pub(crate) fn names_any(&self, index: usize, hit: impl Fn(&str) -> bool) -> bool {
        let Some(node) = self.statement(index) else {
            return false;
        };
        node.nodes().iter().any(|(node, _, _, _)| match node {
            NodeRef::RangeVar(v) => hit(&v.relname),
            NodeRef::CommonTableExpr(c) => hit(&c.ctename),
            NodeRef::FuncCall(f) => f.funcname.last().is_some_and(|n| match &n.node {
                Some(NodeEnum::String(name)) => hit(&name.sval),
                _ => false,
            }),
            _ => false,
        })
    }

    /// The parse tree of statement `index`.
    pub(crate) fn statement(&self, index: usize) -> Option<&NodeEnum> {
        self.parsed
            .protobuf
            .stmts
            .get(index)
            .and_then(|s| s.stmt.as_ref())
            .and_then(|s| s.node.as_ref())
    }

    /// Statement `index`'s parse tree as JSON: every node kind with every
    /// field, for walks that must miss none.
    pub(crate) fn statement_tree(&self, index: usize) -> Option<Value> {
        let statement = self.parsed.protobuf.stmts.get(index)?;
        serde_json::to_value(statement.stmt.as_deref()?).ok()
    }

    /// The text of statement `index` in `sql`, as PostgreSQL cut it.
    pub(crate) fn text<'s>(&self, index: usize, sql: &'s str) -> &'s str {
        let Some(statement) = self.parsed.protobuf.stmts.get(index) else {
            return "";
        };
        let start = usize::try_from(statement.stmt_location).unwrap_or(0);
        let end = match usize::try_from(statement.stmt_len) {
            Ok(0) | Err(_) => sql.len(),
            Ok(len) => start.saturating_add(len),
        };
        sql.get(start..end.min(sql.len())).unwrap_or(sql)
    }

    /// True when `proxy_sql` (one statement, as the proxy understood
    /// statement `index` and prints it) is read by PostgreSQL as exactly
    /// the statement it reads at `index` of the client's text.
    pub(crate) fn agrees(&self, index: usize, proxy_sql: &str) -> bool {
        let Some(ours) = self.parsed.protobuf.stmts.get(index) else {
            return false;
        };
        let Ok(theirs) = pg_query::parse(proxy_sql, pg_query::ParserOptions::DEFAULT) else {
            return false;
        };
        match theirs.protobuf.stmts.as_slice() {
            [theirs] => tree(ours).is_some_and(|a| tree(theirs).is_some_and(|b| a == b)),
            _ => false,
        }
    }
}

/// A statement's parse tree as JSON without positions in the text, and
/// with operators named without a `pg_catalog.` qualifier (sqlparser is
/// given `OPERATOR(pg_catalog.=) ANY` as `= ANY`, see
/// `gate::with_plain_comparisons`; which columns and relations a statement
/// touches does not depend on it).
fn tree(statement: &RawStmt) -> Option<Value> {
    let mut value = serde_json::to_value(statement.stmt.as_deref()?).ok()?;
    strip_positions(&mut value);
    unqualify_operators(&mut value);
    Some(value)
}

/// Drops `pg_catalog` from the operator names of expressions (`AExpr`).
fn unqualify_operators(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Array(name)) = map
                .get_mut("AExpr")
                .and_then(|e| e.as_object_mut())
                .and_then(|e| e.get_mut("name"))
            {
                let qualified = name.len() == 2
                    && name[0].pointer("/node/String/sval") == Some(&Value::from("pg_catalog"));
                if qualified {
                    name.remove(0);
                }
            }
            map.values_mut().for_each(unqualify_operators);
        }
        Value::Array(items) => items.iter_mut().for_each(unqualify_operators),
        _ => {}
    }
}

/// Removes every field that says where in the text a node stood.
fn strip_positions(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|key, _| !is_position(key));
            map.values_mut().for_each(strip_positions);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_positions),
        _ => {}
    }
}

fn is_position(key: &str) -> bool {
    key == "location"
        || key.ends_with("_location")
        || matches!(
            key,
            "stmt_len" | "list_start" | "list_end" | "rexpr_list_start" | "rexpr_list_end"
        )
}

fn class_of(statement: &RawStmt) -> StatementClass {
    let Some(node) = statement.stmt.as_ref().and_then(|s| s.node.as_ref()) else {
        return StatementClass::Plain;
    };
    match node {
        NodeEnum::TransactionStmt(_)
        | NodeEnum::VariableSetStmt(_)
        | NodeEnum::DiscardStmt(_)
        | NodeEnum::PrepareStmt(_)
        | NodeEnum::ExecuteStmt(_)
        | NodeEnum::DeallocateStmt(_)
        | NodeEnum::CopyStmt(_)
        | NodeEnum::DoStmt(_)
        | NodeEnum::CreateFunctionStmt(_)
        | NodeEnum::AlterFunctionStmt(_)
        | NodeEnum::CreateTrigStmt(_)
        | NodeEnum::CreateEventTrigStmt(_)
        | NodeEnum::RuleStmt(_)
        | NodeEnum::CallStmt(_)
        | NodeEnum::AlterSystemStmt(_)
        | NodeEnum::AlterRoleSetStmt(_)
        | NodeEnum::AlterDatabaseSetStmt(_)
        // A rename can put a policy name on other data without naming it.
        | NodeEnum::RenameStmt(_)
        | NodeEnum::AlterObjectSchemaStmt(_) => StatementClass::Followed,
        NodeEnum::CreateStmt(_)
        | NodeEnum::AlterTableStmt(_)
        | NodeEnum::DropStmt(_)
        | NodeEnum::ViewStmt(_)
        | NodeEnum::CreateSchemaStmt(_)
        | NodeEnum::CreateTableAsStmt(_)
        | NodeEnum::CreateDomainStmt(_)
        | NodeEnum::AlterDomainStmt(_)
        | NodeEnum::CompositeTypeStmt(_)
        | NodeEnum::CreateEnumStmt(_)
        | NodeEnum::AlterEnumStmt(_)
        | NodeEnum::DropOwnedStmt(_)
        | NodeEnum::ReassignOwnedStmt(_) => StatementClass::Ddl,
        // LOCK TABLE (pg_dump locks every table it dumps) reads and
        // writes nothing: it passes like SHOW, whatever it names.
        NodeEnum::VariableShowStmt(_) | NodeEnum::LockStmt(_) => StatementClass::Show,
        _ => StatementClass::Plain,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_printed_back_differently_spaced_agrees() {
        let reading = PgReading::of("select a,b from t where x = $1 -- c\n").unwrap();
        assert!(reading.agrees(0, "SELECT a, b FROM t WHERE x = $1"));
        assert!(!reading.agrees(0, "SELECT a, b FROM t WHERE x = $2"));
        assert!(!reading.agrees(0, "SELECT a FROM t WHERE x = $1"));
    }

    #[test]
    fn the_dollar_quote_with_a_non_ascii_tag_hides_nothing_from_postgresql() {
        let sql = "WITH w AS (SELECT $§$, '$§$ AS a), c AS (INSERT INTO patients (tenant_id, ssn) \
                   VALUES ($$acme$$, $$PLAINTEXT$$) RETURNING id) SELECT id FROM c --') SELECT 1";
        let reading = PgReading::of(sql).unwrap();
        assert_eq!(reading.len(), 1);
        assert!(reading.names_any(0, |n| n == "patients"));
    }

    #[test]
    fn unicode_escaped_names_are_decoded() {
        let reading = PgReading::of("SELECT * FROM U&\"p\\0061tients\"").unwrap();
        assert!(reading.names_any(0, |n| n == "patients"));
        let reading =
            PgReading::of("SELECT 1; SELECT pg_catalog.set_config('a', 'b', true)").unwrap();
        assert!(!reading.names_any(0, |n| n == "set_config"));
        assert!(reading.names_any(1, |n| n == "set_config"));
        assert_eq!(reading.text(1, "SELECT 1; SELECT x"), "SELECT x");
    }

    #[test]
    fn statements_are_classed() {
        let reading =
            PgReading::of("BEGIN; CREATE VIEW v AS SELECT 1; SELECT 1; RESET ALL").unwrap();
        assert_eq!(
            reading.classes().to_vec(),
            vec![
                StatementClass::Followed,
                StatementClass::Ddl,
                StatementClass::Plain,
                StatementClass::Followed
            ]
        );
    }
}
