//! Unit tests of the equality lookups' rewrite.

use super::super::{analyze_in, SchemaFacts, StatementPlan, TenantSource, WritePlan, KM003};
use super::{LookupSlot, LookupValue};
use crate::config::{parse_policy, Policy};

fn policy() -> Policy {
    parse_policy(
        "tables:\n  public.patients:\n    tenant_column: tenant_id\n    columns:\n      ssn: {type: text, search: equality}\n      mrn: {type: int8, search: equality}\n      score: {type: numeric, search: equality}\n      notes: {type: text}\n",
        "test",
    )
    .unwrap()
}

/// The blind indexes of `ssn`, `mrn` and `score` proven complete.
fn facts() -> SchemaFacts {
    SchemaFacts {
        indexed_columns: ["ssn", "mrn", "score"]
            .iter()
            .map(|c| format!("public.patients.{c}"))
            .collect(),
        ..SchemaFacts::default()
    }
}

fn analyze(
    policy: &Policy,
    sql: &str,
    params: usize,
) -> Result<super::super::Analysis, super::super::Rejection> {
    analyze_in(policy, &facts(), sql, params)
}

fn lookup_plan(sql: &str, params: usize) -> WritePlan {
    match analyze(&policy(), sql, params) {
        Ok(analysis) => match analysis.statements.into_iter().next() {
            Some(StatementPlan::Write(plan)) if !plan.lookups.is_empty() => *plan,
            other => panic!("{sql}: expected lookups, got {other:?}"),
        },
        Err(e) => panic!("{sql}: {e}"),
    }
}

#[test]
fn equality_becomes_a_blind_index_comparison_pinned_to_the_tenant() {
    let plan = lookup_plan("SELECT id FROM patients WHERE ssn = '123-45-6789'", 0);
    assert_eq!(
        plan.statement.to_string(),
        "SELECT id FROM patients WHERE (patients.\"ssn_bidx\" = $2::BYTEA AND patients.\"tenant_id\" = $1)"
    );
    let [lookup] = plan.lookups.as_slice() else {
        panic!("{:?}", plan.lookups)
    };
    assert_eq!(lookup.tenant, TenantSource::Session);
    assert_eq!(
        lookup.values,
        vec![LookupSlot {
            value: LookupValue::Literal(Some("123-45-6789".into())),
            index_param: 2
        }]
    );
    assert_eq!(plan.extra_params, 2);
    assert!(plan.cleared.is_empty());
}

#[test]
fn orm_shapes_are_answered() {
    // Django: qualified, quoted, LIMIT 21.
    let plan = lookup_plan(
        "SELECT \"patients\".\"id\", \"patients\".\"ssn\" FROM \"patients\" WHERE \"patients\".\"ssn\" = $1 LIMIT 21",
        1,
    );
    assert_eq!(plan.cleared, vec![1]);
    assert_eq!(plan.hidden_results, 1, "the row tenant is added");
    assert!(plan
        .statement
        .to_string()
        .contains("\"patients\".\"ssn_bidx\" = $3::BYTEA"));
    // SQLAlchemy with an alias, and the tenant from the same WHERE.
    let plan = lookup_plan(
        "SELECT p.id FROM patients AS p WHERE p.tenant_id = $1 AND p.ssn = $2",
        2,
    );
    assert_eq!(plan.lookups[0].tenant, TenantSource::Param(1));
    assert_eq!(plan.cleared, vec![2]);
    // Casts that restate the type.
    let plan = lookup_plan(
        "SELECT id FROM patients WHERE ssn = $1::text AND mrn = '7'::bigint",
        1,
    );
    assert_eq!(plan.lookups.len(), 2);
    // The tenant column named by a literal.
    let plan = lookup_plan(
        "SELECT id FROM patients WHERE tenant_id = 'acme' AND ssn = 'x'",
        0,
    );
    assert_eq!(plan.lookups[0].tenant, TenantSource::Literal("acme".into()));
}

#[test]
fn in_lists_arrays_and_negations_are_answered() {
    let plan = lookup_plan("SELECT id FROM patients WHERE ssn IN ('a', 'b', NULL)", 0);
    assert_eq!(plan.lookups[0].values.len(), 3);
    assert!(plan
        .statement
        .to_string()
        .contains("\"ssn_bidx\" IN ($2::BYTEA, $3::BYTEA, $4::BYTEA)"));
    let plan = lookup_plan("SELECT id FROM patients WHERE ssn = ANY($1)", 1);
    assert_eq!(plan.lookups[0].values[0].value, LookupValue::ArrayParam(1));
    assert!(
        plan.statement.to_string().contains("= ANY($3::BYTEA[])"),
        "{}",
        plan.statement
    );
    let plan = lookup_plan("SELECT id FROM patients WHERE ssn = ANY(ARRAY['a', $1])", 1);
    assert_eq!(plan.lookups[0].values.len(), 2);
    let plan = lookup_plan(
        "SELECT id FROM patients WHERE ssn <> 'a' OR mrn NOT IN (1, 2)",
        0,
    );
    assert_eq!(plan.lookups.len(), 2);
}

#[test]
fn lookups_in_updates_deletes_subqueries_and_ctes() {
    let plan = lookup_plan("UPDATE patients SET notes = $1 WHERE ssn = $2", 2);
    assert_eq!(plan.rows.len(), 1, "the SET value is still sealed");
    assert_eq!(plan.cleared, vec![2]);
    let plan = lookup_plan("DELETE FROM patients WHERE ssn = 'x' RETURNING id", 0);
    assert!(plan
        .statement
        .to_string()
        .starts_with("DELETE FROM patients WHERE (patients.\"ssn_bidx\""));
    let plan = lookup_plan(
        "SELECT d.name FROM doctors d WHERE d.id IN (SELECT doctor_id FROM patients WHERE ssn = 'x')",
        0,
    );
    assert_eq!(plan.lookups.len(), 1);
    let plan = lookup_plan(
        "WITH hit AS (SELECT id FROM patients WHERE ssn = 'x') SELECT id FROM hit",
        0,
    );
    assert_eq!(plan.lookups.len(), 1);
}

#[test]
fn what_cannot_be_answered_exactly_is_still_refused() {
    for (sql, params) in [
        // Not a searchable column, or not an equality.
        ("SELECT id FROM patients WHERE notes = 'x'", 0),
        ("SELECT id FROM patients WHERE ssn > 'x'", 0),
        ("SELECT id FROM patients WHERE ssn LIKE 'x%'", 0),
        ("SELECT id FROM patients WHERE lower(ssn) = 'x'", 0),
        ("SELECT id FROM patients ORDER BY ssn", 0),
        ("SELECT id FROM patients WHERE NOT (ssn = 'x')", 0),
        (
            "SELECT id FROM patients WHERE CASE WHEN ssn = 'x' THEN true END",
            0,
        ),
        // Two protected columns compared.
        (
            "SELECT a.id FROM patients a, patients b WHERE a.ssn = b.ssn",
            0,
        ),
        // numeric: 1.0 = 1.00, but their texts differ.
        ("SELECT id FROM patients WHERE score = '1.0'", 0),
        // A bare name with several relations in FROM: PostgreSQL decides.
        ("SELECT p.id FROM patients p, doctors d WHERE ssn = 'x'", 0),
        // text = integer is an error in PostgreSQL, not a match.
        ("SELECT id FROM patients WHERE ssn = 5", 0),
        // Casts that can change the value compared.
        ("SELECT id FROM patients WHERE ssn = 'abc'::char(2)", 0),
        ("SELECT id FROM patients WHERE ssn = $1::varchar(3)", 1),
        ("SELECT id FROM patients WHERE mrn = '1.5'::numeric", 0),
        // The parameter would still reach the server.
        ("SELECT id, $1::text FROM patients WHERE ssn = $1", 1),
    ] {
        let refusal = analyze(&policy(), sql, params).expect_err(sql);
        assert_eq!(refusal.sqlstate, KM003, "{sql}: {}", refusal.message);
    }
}

#[test]
fn correlated_and_unqualified_outer_names_are_not_guessed() {
    // `ssn` in the subquery is doctors' if it has one: not rewritten.
    let refusal = analyze(
        &policy(),
        "SELECT id FROM patients p WHERE EXISTS (SELECT 1 FROM doctors d WHERE p.ssn = 'x')",
        0,
    )
    .expect_err("correlated");
    assert_eq!(refusal.sqlstate, KM003);
}

#[test]
fn a_blind_index_not_proven_complete_or_an_inexact_type_is_refused_saying_why() {
    let refusal = analyze_in(
        &policy(),
        &SchemaFacts::default(),
        "SELECT id FROM patients WHERE ssn = 'x'",
        0,
    )
    .expect_err("not proven complete");
    assert_eq!(refusal.sqlstate, KM003);
    assert!(
        refusal.message.contains("cmk_bidx_ssn"),
        "{}",
        refusal.message
    );
    let refusal =
        analyze(&policy(), "SELECT id FROM patients WHERE score = '1.0'", 0).expect_err("numeric");
    assert!(refusal.message.contains("numeric"), "{}", refusal.message);
}

#[test]
fn an_unnest_insert_seals_each_protected_array() {
    let sql = "INSERT INTO \"patients\" (\"tenant_id\", \"notes\", \"ssn\") SELECT * FROM \
               UNNEST(('{acme,globex}')::varchar[], ('{a,NULL}')::text[], $1::varchar[]) \
               RETURNING \"patients\".\"id\"";
    let analysis = analyze(&policy(), sql, 1).expect("planned");
    let Some(StatementPlan::Write(plan)) = analysis.statements.first() else {
        panic!("{analysis:?}")
    };
    let unnest = plan.unnest.as_ref().expect("an UNNEST plan");
    assert_eq!(
        unnest.tenants,
        super::super::ArraySource::Literal("{acme,globex}".into())
    );
    let columns: Vec<&str> = unnest.cells.iter().map(|c| c.column.as_str()).collect();
    assert_eq!(columns, ["notes", "ssn"]);
    assert_eq!(
        unnest.cells[1].target_param, 1,
        "the parameter carries its cells"
    );
    assert!(unnest.cells[1].bidx_param.is_some());
    let sent = plan.statement.to_string();
    assert!(
        sent.contains("\"ssn\", ssn_bidx, cmk_edek) SELECT * FROM UNNEST(('{acme,globex}')::VARCHAR[], $2::BYTEA[], $1::BYTEA[], $3::BYTEA[], $4::JSONB[])"),
        "{sent}"
    );
    // Other shapes of INSERT … SELECT stay refused.
    for sql in [
        "INSERT INTO patients (tenant_id, ssn) SELECT * FROM UNNEST($1::text[], $2::text[]) WHERE true",
        "INSERT INTO patients (tenant_id, ssn) SELECT * FROM UNNEST($1::text[], upper($2)::text[])",
        "INSERT INTO patients (ssn) SELECT * FROM UNNEST($1::text[])",
        "INSERT INTO patients (tenant_id, ssn) SELECT * FROM UNNEST($1::text[], $2::text[]) WITH ORDINALITY",
    ] {
        let refusal = analyze(&policy(), sql, 2).expect_err(sql);
        assert_eq!(refusal.sqlstate, KM003, "{sql}: {}", refusal.message);
    }
}
