//! SQL-level prepared statements (`PREPARE p AS …`, `EXECUTE p`,
//! `DEALLOCATE`), read as PostgreSQL reads them. PostgreSQL plans such a
//! statement again at EXECUTE when the schema changed, so the proxy must
//! know what each name runs.

use pg_query::protobuf::DiscardMode;
use pg_query::NodeEnum;

use super::pg_reading::PgReading;

/// What a statement does to the session's SQL-level prepared statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SqlPrepareOp {
    /// `PREPARE name AS …`: the statement's whole text.
    Prepare { name: String, text: String },
    /// `EXECUTE name` (also under EXPLAIN or CREATE TABLE AS).
    Execute(String),
    /// `DEALLOCATE name`; `None`: `DEALLOCATE ALL` or `DISCARD ALL`.
    Deallocate(Option<String>),
}

/// The SQL-level prepared-statement operations of `sql`, in order (none
/// when PostgreSQL's grammar rejects it: the server then runs nothing).
pub fn sql_prepare_ops(sql: &str) -> Vec<SqlPrepareOp> {
    let Some(reading) = PgReading::of(sql) else {
        return Vec::new();
    };
    let mut ops = Vec::new();
    for index in 0..reading.len() {
        let op = match reading.statement(index) {
            Some(NodeEnum::PrepareStmt(prepare)) => Some(SqlPrepareOp::Prepare {
                name: prepare.name.clone(),
                text: reading.text(index, sql).to_owned(),
            }),
            Some(NodeEnum::DeallocateStmt(deallocate)) => Some(SqlPrepareOp::Deallocate(
                (!deallocate.isall).then(|| deallocate.name.clone()),
            )),
            Some(NodeEnum::DiscardStmt(discard))
                if DiscardMode::try_from(discard.target) == Ok(DiscardMode::DiscardAll) =>
            {
                Some(SqlPrepareOp::Deallocate(None))
            }
            Some(statement) => executed(statement).map(SqlPrepareOp::Execute),
            None => None,
        };
        ops.extend(op);
    }
    ops
}

/// The name a statement executes: `EXECUTE p`, `EXPLAIN EXECUTE p`,
/// `CREATE TABLE t AS EXECUTE p`.
fn executed(statement: &NodeEnum) -> Option<String> {
    let inner = |node: &Option<Box<pg_query::protobuf::Node>>| {
        node.as_ref()
            .and_then(|n| n.node.as_ref())
            .and_then(executed)
    };
    match statement {
        NodeEnum::ExecuteStmt(execute) => Some(execute.name.clone()),
        NodeEnum::ExplainStmt(explain) => inner(&explain.query),
        NodeEnum::CreateTableAsStmt(create) => inner(&create.query),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_execute_and_deallocate_are_read_as_postgresql_reads_them() {
        let ops = sql_prepare_ops(
            "PREPARE \"Ins\"(int) AS INSERT INTO t VALUES ($1); EXECUTE \"Ins\"(1); \
             explain analyze execute ins(2); CREATE TABLE c AS EXECUTE ins(3); \
             DEALLOCATE ins; DEALLOCATE ALL; DISCARD ALL; DISCARD PLANS; SELECT 'execute x'",
        );
        assert_eq!(
            ops,
            vec![
                SqlPrepareOp::Prepare {
                    name: "Ins".to_owned(),
                    text: "PREPARE \"Ins\"(int) AS INSERT INTO t VALUES ($1)".to_owned()
                },
                SqlPrepareOp::Execute("Ins".to_owned()),
                SqlPrepareOp::Execute("ins".to_owned()),
                SqlPrepareOp::Execute("ins".to_owned()),
                SqlPrepareOp::Deallocate(Some("ins".to_owned())),
                SqlPrepareOp::Deallocate(None),
                SqlPrepareOp::Deallocate(None),
            ]
        );
    }
}
