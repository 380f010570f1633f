//! Schema changes a session has sent but the proxy's catalog does not show
//! yet. The catalog is read on the proxy's own connection, which sees a
//! view created in a client's open transaction (or earlier in its pipeline)
//! only once that transaction commits. Until then, a statement that reads
//! or writes a relation such DDL created, replaced or renamed would be
//! planned against the old schema: `CREATE VIEW v AS SELECT * FROM
//! patients` then `INSERT INTO v …` would store plaintext. Such statements
//! are refused until the change is committed and the catalog reloaded.

use std::collections::HashSet;

use pg_query::NodeEnum;
use serde_json::Value;

use super::analyze::{SchemaFacts, Scope};
use super::gate::is_guarded_name;
use super::pg_reading::{PgReading, StatementClass};
use super::{Rejection, KM003};
use crate::config::Policy;

/// What a query string does to the names in flux. `Some(names)` when it
/// holds DDL on protected data (or on names already in flux): the relation
/// names that DDL creates, replaces, alters or renames, to add to the
/// session's flux (the catalog is reloaded once it commits, even when
/// there are none: the DDL may have altered a policy table). `None` when
/// it changes nothing the proxy plans with. `Err`: a statement reads or
/// writes a name in flux.
pub fn schema_flux(
    policy: &Policy,
    facts: &SchemaFacts,
    sql: &str,
    in_flux: &HashSet<String>,
) -> Result<Option<Vec<String>>, Rejection> {
    let mut changed = Vec::new();
    let mut relevant_ddl = false;
    if policy.tables.is_empty() {
        return Ok(None);
    }
    // SQL that PostgreSQL's grammar rejects fails at the server.
    let Some(reading) = PgReading::of(sql) else {
        return Ok(None);
    };
    let scope = Scope::new(policy, facts);
    for index in 0..reading.len() {
        let Some(statement) = reading.statement(index) else {
            continue;
        };
        let flux_named = |name: &str| in_flux.contains(name) || changed.iter().any(|c| c == name);
        let schema_change = changes_schema(&reading, index, statement);
        if !schema_change && !runs_on_data(statement) {
            continue;
        }
        let names = relation_names(statement);
        if schema_change {
            let relevant = names
                .iter()
                .any(|name| flux_named(name) || is_guarded_name(&scope, name));
            if relevant {
                relevant_ddl = true;
                let is_policy_table = |name: &str| {
                    policy
                        .tables
                        .keys()
                        .any(|key| key.rsplit('.').next() == Some(name))
                };
                changed.extend(names.into_iter().filter(|name| !is_policy_table(name)));
            }
        } else if let Some(name) = names.into_iter().find(|name| flux_named(name)) {
            return Err(Rejection {
                sqlstate: KM003,
                table: None,
                column: None,
                message: format!(
                    "cmk-proxy: \"{name}\" was created, replaced or renamed earlier in this \
                     transaction by DDL on protected data, which cmk-proxy sees only once it \
                     is committed: commit the DDL first, then run this statement"
                ),
            });
        }
    }
    Ok(relevant_ddl.then_some(changed))
}

/// DDL, or a rename or change of schema (which may put a name on other data).
fn changes_schema(reading: &PgReading, index: usize, statement: &NodeEnum) -> bool {
    reading.classes().get(index) == Some(&StatementClass::Ddl)
        || matches!(
            statement,
            NodeEnum::RenameStmt(_) | NodeEnum::AlterObjectSchemaStmt(_)
        )
}

/// A statement that reads or writes rows of the relations it names.
fn runs_on_data(statement: &NodeEnum) -> bool {
    matches!(
        statement,
        NodeEnum::SelectStmt(_)
            | NodeEnum::InsertStmt(_)
            | NodeEnum::UpdateStmt(_)
            | NodeEnum::DeleteStmt(_)
            | NodeEnum::MergeStmt(_)
            | NodeEnum::CopyStmt(_)
            | NodeEnum::ExplainStmt(_)
            | NodeEnum::PrepareStmt(_)
            | NodeEnum::DeclareCursorStmt(_)
            | NodeEnum::CallStmt(_)
    )
}

/// The relation names a statement holds (their last part, as PostgreSQL
/// decoded them), and the new name of a rename. Read from the whole tree
/// (pg_query's own walk skips parts of some statements); only DDL and
/// statements of sessions with names in flux are read so.
fn relation_names(statement: &NodeEnum) -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(tree) = serde_json::to_value(statement) {
        collect_relnames(&tree, &mut names);
    }
    if let NodeEnum::RenameStmt(rename) = statement {
        if !rename.newname.is_empty() {
            names.push(rename.newname.clone());
        }
    }
    names
}

/// Every `relname` (a RangeVar's) in a parse tree as JSON. The tree's depth
/// is bounded: libpg_query's protobuf decoder refuses deeper ones.
fn collect_relnames(value: &Value, names: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("relname", Value::String(name)) => names.push(name.clone()),
                    _ => collect_relnames(value, names),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_relnames(item, names)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        crate::config::parse_policy(
            "tables:\n  public.patients:\n    tenant_column: tenant_id\n    columns:\n      ssn: {type: text}\n",
            "test",
        )
        .unwrap()
    }

    #[test]
    fn ddl_over_protected_data_puts_its_names_in_flux_and_later_statements_on_them_are_refused() {
        let policy = policy();
        let facts = SchemaFacts::default();
        let none = HashSet::new();
        let changed = schema_flux(
            &policy,
            &facts,
            "CREATE VIEW v AS SELECT * FROM patients",
            &none,
        )
        .unwrap();
        assert_eq!(changed, Some(vec!["v".to_owned()]));
        let flux: HashSet<String> = changed.into_iter().flatten().collect();
        for sql in [
            "INSERT INTO v (tenant_id, ssn) VALUES ('a', 'b')",
            "UPDATE public.v SET ssn = 'x'",
            "SELECT * FROM v",
            "WITH c AS (SELECT 1) DELETE FROM \"v\"",
            "PREPARE p AS INSERT INTO v VALUES ('a')",
            "COPY v FROM STDIN",
        ] {
            let refused = schema_flux(&policy, &facts, sql, &flux).unwrap_err();
            assert_eq!(refused.sqlstate, KM003, "{sql}");
        }
        // Other relations, and further DDL, pass; DDL on a name in flux
        // puts its own names in flux too.
        assert!(schema_flux(&policy, &facts, "INSERT INTO other VALUES (1)", &flux).is_ok());
        assert!(schema_flux(&policy, &facts, "GRANT SELECT ON v TO app", &flux).is_ok());
        let more = schema_flux(&policy, &facts, "CREATE VIEW w AS SELECT * FROM v", &flux).unwrap();
        assert_eq!(more, Some(vec!["v".to_owned(), "w".to_owned()]));
        // In one query string, the DDL's names are in flux for what follows.
        let refused = schema_flux(
            &policy,
            &facts,
            "CREATE OR REPLACE VIEW sv AS SELECT * FROM patients; INSERT INTO sv VALUES (1)",
            &none,
        );
        assert!(refused.is_err());
    }

    #[test]
    fn ddl_on_unprotected_relations_and_renames_of_them_change_nothing() {
        let policy = policy();
        let facts = SchemaFacts::default();
        let none = HashSet::new();
        for sql in [
            "CREATE TABLE t (x int); INSERT INTO t VALUES (1)",
            "CREATE VIEW v AS SELECT * FROM t",
            "ALTER TABLE t RENAME TO u",
        ] {
            assert_eq!(
                schema_flux(&policy, &facts, sql, &none).unwrap(),
                None,
                "{sql}"
            );
        }
        // DDL on a policy table puts no name in flux, but the catalog is
        // reloaded once it commits.
        let altered = schema_flux(
            &policy,
            &facts,
            "ALTER TABLE patients ADD COLUMN note2 text",
            &none,
        );
        assert_eq!(altered.unwrap(), Some(Vec::new()));
        // A rename onto or off a policy table's name is in flux.
        let renamed = schema_flux(&policy, &facts, "ALTER TABLE t RENAME TO patients", &none);
        assert_eq!(renamed.unwrap(), Some(vec!["t".to_owned()]));
    }
}
