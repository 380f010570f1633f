//! Unit tests of statement planning against a small policy.

use std::collections::HashMap;

use super::*;
use crate::config::{parse_policy, Policy};

mod schema_changes;
mod tenant_and_refusals;

pub(super) fn policy() -> Policy {
    parse_policy(
        "tables:\n  public.patients:\n    tenant_column: tenant_id\n    columns:\n      ssn: {type: text, search: equality}\n      birth_date: {type: date}\n      notes: {type: text}\n",
        "test",
    )
    .unwrap()
}

pub(super) fn write_plan(sql: &str, params: usize) -> WritePlan {
    let analysis = analyze(&policy(), sql, params).unwrap();
    match analysis.statements.into_iter().next() {
        Some(StatementPlan::Write(plan)) => *plan,
        other => panic!("expected a write plan, got {other:?}"),
    }
}

pub(super) fn rejection(sql: &str) -> Rejection {
    analyze(&policy(), sql, 0).unwrap_err()
}

/// The KM003 refusal of `sql`, whose message says `saying`.
pub(super) fn refused_saying(sql: &str, saying: &str) -> Rejection {
    let refusal = rejection(sql);
    assert_eq!(refusal.sqlstate, KM003, "{sql}: {}", refusal.message);
    assert!(
        refusal.message.contains(saying),
        "{sql}: {}",
        refusal.message
    );
    refusal
}

#[test]
fn statements_on_other_tables_are_untouched() {
    let a = analyze(
        &policy(),
        "SELECT * FROM doctors WHERE name LIKE 'a%'; UPDATE doctors SET x = 1",
        0,
    )
    .unwrap();
    assert!(a
        .statements
        .iter()
        .all(|s| matches!(s, StatementPlan::Untouched)));
    assert!(!a.needs_rewrite());
}

#[test]
fn plain_reads_of_protected_columns_are_allowed() {
    let sql = "SELECT id FROM patients WHERE tenant_id = 'acme'";
    let a = analyze(&policy(), sql, 0).unwrap();
    assert!(matches!(a.statements[0], StatementPlan::Read), "{sql}");
    // Protected columns come with their rows' tenant, hidden.
    for (sql, sent) in [
        (
            "SELECT ssn, notes AS n, p.birth_date FROM patients p WHERE id = 1",
            "SELECT ssn, notes AS n, p.birth_date, \"p\".\"tenant_id\" AS \"cmk$row_tenant\" \
             FROM patients AS p WHERE id = 1",
        ),
        (
            "SELECT * FROM public.patients ORDER BY id",
            "SELECT *, \"patients\".\"tenant_id\" AS \"cmk$row_tenant\" FROM public.patients \
             ORDER BY id",
        ),
        (
            "DELETE FROM patients p WHERE id = 1 RETURNING id, ssn",
            "DELETE FROM patients AS p WHERE id = 1 RETURNING id, ssn, \"p\".\"tenant_id\" AS \
             \"cmk$row_tenant\"",
        ),
    ] {
        let a = analyze(&policy(), sql, 0).unwrap();
        match &a.statements[0] {
            StatementPlan::ReadRowTenants(read) => {
                assert_eq!(read.sql, sent, "{sql}");
                assert_eq!(read.hidden, 1, "{sql}");
            }
            other => panic!("{sql}: {other:?}"),
        }
    }
    refused_saying(
        "SELECT a.ssn, b.notes FROM patients a JOIN patients b ON a.id = b.id",
        "self-join",
    );
    // Through a CTE or subquery the row's tenant cannot be added: refused.
    refused_saying(
        "WITH x AS (SELECT ssn FROM patients) SELECT * FROM x",
        "without the tenant column",
    );
}

#[test]
fn conditions_and_expressions_on_protected_columns_are_refused_with_km003() {
    for (sql, column) in [
        ("SELECT id FROM patients WHERE notes = '1'", "notes"),
        ("SELECT id FROM patients WHERE ssn > '1'", "ssn"),
        ("SELECT id FROM patients WHERE upper(ssn) = 'X'", "ssn"),
        ("SELECT id FROM patients WHERE ssn LIKE '1%'", "ssn"),
        ("SELECT id FROM patients ORDER BY birth_date", "birth_date"),
        (
            "SELECT notes, count(*) FROM patients GROUP BY notes",
            "notes",
        ),
        ("SELECT upper(notes) FROM patients", "notes"),
        ("SELECT id FROM patients WHERE notes LIKE 'x%'", "notes"),
        (
            "SELECT id FROM patients WHERE birth_date > '2000-01-01'",
            "birth_date",
        ),
        ("DELETE FROM patients WHERE notes = $1", "notes"),
        ("UPDATE patients SET notes = 'x' WHERE notes = '1'", "notes"),
    ] {
        let r = rejection(sql);
        assert_eq!(r.sqlstate, KM003, "{sql}");
        assert_eq!(r.column.as_deref(), Some(column), "{sql}");
        assert!(
            r.message.contains(&format!("public.patients.{column}")),
            "{sql}: {}",
            r.message
        );
    }
}

#[test]
fn copy_insert_select_and_unparseable_sql_on_protected_tables_are_refused() {
    // COPY forms the proxy cannot take part in (see rewrite/copy.rs).
    assert_eq!(rejection("COPY patients FROM STDIN").sqlstate, KM003);
    assert_eq!(
        rejection("COPY public.patients (notes) TO '/tmp/x'").sqlstate,
        KM003
    );
    let r = rejection("INSERT INTO patients (tenant_id, ssn) SELECT tenant_id, ssn FROM old");
    assert_eq!(r.sqlstate, KM003);
    assert!(r.message.contains("INSERT ... SELECT"), "{}", r.message);
    let r = rejection("SELEC ssn FROM patients");
    assert!(r.message.contains("cannot parse"), "{}", r.message);
    // Unparseable SQL that names no protected table passes untouched.
    assert!(analyze(&policy(), "VACUUM (VERBOSE) doctors %%", 0).is_ok());
}

#[test]
fn insert_literals_become_slots_with_edek_and_blind_index() {
    let plan = write_plan(
        "INSERT INTO patients (tenant_id, ssn, birth_date, notes) VALUES ('acme', '123-45-6789', '1980-01-02', NULL), ('globex', '999', '1990-03-04', 'n') RETURNING id, ssn",
        0,
    );
    assert_eq!(plan.rows.len(), 2);
    assert_eq!(plan.rows[0].tenant, TenantSource::Literal("acme".into()));
    assert_eq!(plan.rows[0].cells.len(), 2, "NULL notes is not encrypted");
    assert_eq!(
        plan.rows[0].cells[0].column, "ssn",
        "cells follow the column list"
    );
    assert_eq!(plan.rows[1].cells.len(), 3);
    let ssn = plan.rows[0]
        .cells
        .iter()
        .find(|c| c.column == "ssn")
        .unwrap();
    assert_eq!(ssn.value, ValueSource::Literal("123-45-6789".into()));
    assert!(ssn.bidx_param.is_some());
    let sql = plan.statement.to_string();
    assert!(sql.contains("cmk_edek"), "{sql}");
    assert!(sql.contains("ssn_bidx"), "{sql}");
    assert!(
        !sql.contains("123-45-6789"),
        "plaintext must leave the SQL: {sql}"
    );
    assert!(sql.contains("RETURNING id, ssn"), "{sql}");
}

#[test]
fn insert_parameters_keep_their_numbers_and_extras_follow() {
    let plan = write_plan(
        "INSERT INTO patients (tenant_id, notes, birth_date) VALUES ($1, $2, $3::date)",
        3,
    );
    assert_eq!(plan.rows[0].tenant, TenantSource::Param(1));
    let notes = &plan.rows[0]
        .cells
        .iter()
        .find(|c| c.column == "notes")
        .unwrap();
    assert_eq!(notes.value, ValueSource::Param(2));
    assert_eq!(notes.target_param, 2);
    assert_eq!(plan.rows[0].edek_param, Some(4));
    assert_eq!(plan.extra_params, 1);
    let sql = plan.statement.to_string();
    assert!(
        sql.contains("$3::BYTEA"),
        "the client's cast is replaced: {sql}"
    );
}

#[test]
fn insert_without_tenant_uses_the_session_and_expressions_are_refused() {
    let plan = write_plan("INSERT INTO patients (notes) VALUES ('x')", 0);
    assert_eq!(plan.rows[0].tenant, TenantSource::Session);
    assert_eq!(
        rejection("INSERT INTO patients (tenant_id, notes) VALUES ('a', upper('x'))")
            .column
            .as_deref(),
        Some("notes")
    );
    assert_eq!(
        rejection("INSERT INTO patients (tenant_id, notes) VALUES (lower('A'), 'x')").sqlstate,
        KM004
    );
    assert_eq!(
        rejection("INSERT INTO patients VALUES (1, 'a', 'x')").sqlstate,
        KM003
    );
    assert_eq!(
        rejection("INSERT INTO patients (tenant_id, cmk_edek) VALUES ('a', '{}')").sqlstate,
        KM003
    );
}

#[test]
fn upsert_from_excluded_merges_the_edek() {
    let plan = write_plan(
        "INSERT INTO patients (id, tenant_id, notes) VALUES (1, 'acme', 'x') ON CONFLICT (id) DO UPDATE SET notes = EXCLUDED.notes",
        0,
    );
    let sql = plan.statement.to_string();
    assert!(
        sql.contains("cmk_edek = COALESCE(patients.cmk_edek, '{}'::JSONB) || excluded.cmk_edek"),
        "{sql}"
    );
    assert_eq!(
        rejection("INSERT INTO patients (id, tenant_id, notes) VALUES (1, 'a', 'x') ON CONFLICT (id) DO UPDATE SET notes = 'y'").sqlstate,
        KM003
    );
}

#[test]
fn update_finds_the_tenant_or_pins_to_the_session() {
    let plan = write_plan(
        "UPDATE patients SET notes = $1 WHERE id = $2 AND tenant_id = $3",
        3,
    );
    assert_eq!(plan.rows[0].tenant, TenantSource::Param(3));
    assert_eq!(plan.tenant_pin_param, None);
    let sql = plan.statement.to_string();
    assert!(
        sql.contains("cmk_edek = COALESCE(cmk_edek, '{}'::JSONB) || $4::JSONB"),
        "{sql}"
    );

    let plan = write_plan("UPDATE patients SET notes = 'secret' WHERE id = 7", 0);
    assert_eq!(plan.rows[0].tenant, TenantSource::Session);
    let pin = plan.tenant_pin_param.unwrap();
    let sql = plan.statement.to_string();
    assert!(
        sql.contains(&format!("(id = 7) AND tenant_id = ${pin}")),
        "{sql}"
    );
    assert!(!sql.contains("secret"), "{sql}");
    // Setting the tenant column to a literal or parameter pins the UPDATE
    // to that tenant's rows (see the ORM test below); a real move is refused.
    assert_eq!(
        rejection("UPDATE patients SET tenant_id = 'b' WHERE id = 1 AND tenant_id = 'a'").sqlstate,
        KM003
    );
    assert_eq!(
        rejection("UPDATE patients SET notes = notes || 'x'")
            .column
            .as_deref(),
        Some("notes")
    );
    // The proxy's own columns are never set by a statement.
    for (sql, column) in [
        (
            "UPDATE patients SET ssn_bidx = NULL WHERE id = 1",
            "ssn_bidx",
        ),
        (
            "UPDATE patients SET cmk_edek = '{}' WHERE id = 1",
            "cmk_edek",
        ),
        (
            "INSERT INTO patients (tenant_id, ssn_bidx) VALUES ('a', NULL)",
            "ssn_bidx",
        ),
    ] {
        assert_eq!(rejection(sql).column.as_deref(), Some(column), "{sql}");
    }
}

#[test]
fn rendering_substitutes_literals_for_placeholders() {
    let plan = write_plan(
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'x')",
        0,
    );
    let mut literals = HashMap::new();
    let cell = plan.rows[0].cells[0].target_param;
    literals.insert(cell, "'\\x434d4b01'".to_owned());
    literals.insert(
        plan.rows[0].edek_param.unwrap(),
        quote_literal("{\"k\": \"v\"}"),
    );
    let sql = render_with_literals(&plan.statement, &literals);
    assert_eq!(
        sql,
        "INSERT INTO patients (tenant_id, notes, cmk_edek) VALUES ('acme', '\\x434d4b01'::BYTEA, '{\"k\": \"v\"}'::JSONB)"
    );
}

#[test]
fn tenant_setting_is_recognized() {
    let a = analyze(
        &policy(),
        "SET cmk.tenant_id = 'acme'; SET cmk.tenant_id TO DEFAULT; SET work_mem = '1MB'",
        0,
    )
    .unwrap();
    assert!(
        matches!(&a.statements[0], StatementPlan::SetTenant(TenantChange { tenant: Some(t), local: false, to_default: false, savepoint: None }) if t == "acme")
    );
    assert!(matches!(
        &a.statements[1],
        StatementPlan::SetTenant(change) if *change == TenantChange::reset(false)
    ));
    assert!(matches!(&a.statements[2], StatementPlan::Untouched));
}

#[test]
fn set_config_of_the_tenant_setting_is_followed_or_refused() {
    let a = analyze(
        &policy(),
        "SELECT set_config('cmk.tenant_id', 'acme', false); \
         SELECT set_config('cmk.tenant_id', 'globex', true) AS t; \
         SELECT set_config('cmk.tenant_id', '', false); \
         SELECT set_config('application_name', 'x', false); \
         SELECT set_config('cmk.tenant_id', NULL, true)",
        0,
    )
    .unwrap();
    assert!(
        matches!(&a.statements[0], StatementPlan::SetTenant(TenantChange { tenant: Some(t), local: false, to_default: false, savepoint: None }) if t == "acme")
    );
    assert!(
        matches!(&a.statements[1], StatementPlan::SetTenant(TenantChange { tenant: Some(t), local: true, to_default: false, savepoint: None }) if t == "globex")
    );
    assert!(matches!(
        &a.statements[2],
        StatementPlan::SetTenant(change) if *change == TenantChange::to(None, false)
    ));
    assert!(matches!(&a.statements[3], StatementPlan::Untouched));
    // NULL resets to the session's default, like RESET.
    assert!(matches!(
        &a.statements[4],
        StatementPlan::SetTenant(change) if *change == TenantChange::reset(true)
    ));
    let bound = analyze(&policy(), "SELECT set_config('cmk.tenant_id', $1, true)", 1).unwrap();
    assert!(matches!(
        &bound.statements[0],
        StatementPlan::SetTenantParam {
            param: 1,
            local: true
        }
    ));
    // Forms whose tenant the proxy cannot know are refused, never ignored.
    for sql in [
        "SELECT set_config('cmk.tenant_id', $1 || 'x', false)",
        "SELECT set_config('cmk.tenant_id', $1, $2)",
        "SELECT set_config('cmk.tenant_id', current_user, false)",
        "SELECT set_config('cmk.tenant_id', 'acme', false), 1",
        "SELECT set_config('cmk.tenant_id', t.name, false) FROM tenants t",
        "SELECT 1 WHERE set_config('CMK.TENANT_ID', 'acme', false) IS NOT NULL",
        "UPDATE other SET x = set_config('cmk.tenant_id', 'acme', false)",
    ] {
        let e = analyze(&policy(), sql, 1).unwrap_err();
        assert_eq!(e.sqlstate, "KM003", "{sql}");
        assert!(e.message.contains("set_config"), "{sql}: {}", e.message);
    }
}

#[test]
fn insert_select_from_a_values_list_is_planned_like_values() {
    // SQLAlchemy 2's "insertmanyvalues" form for ORM bulk inserts.
    let plan = write_plan(
        "INSERT INTO patients (tenant_id, ssn, notes, name) SELECT p0::VARCHAR, p1::VARCHAR, \
         p2::TEXT, p3::VARCHAR FROM (VALUES ($1, $2, $3, $4, 0), ($5, $6, NULL, $8, 1)) \
         AS imp_sen(p0, p1, p2, p3, sen_counter) ORDER BY sen_counter RETURNING patients.id",
        8,
    );
    assert_eq!(plan.rows.len(), 2);
    assert_eq!(plan.rows[0].tenant, TenantSource::Param(1));
    assert_eq!(plan.rows[1].tenant, TenantSource::Param(5));
    assert_eq!(plan.rows[0].cells.len(), 2);
    assert_eq!(plan.rows[1].cells.len(), 1, "NULL notes stay NULL");
    let sql = plan.statement.to_string();
    assert!(
        sql.contains("SELECT p0::VARCHAR, p1, p2, p3::VARCHAR, cmk_edek_cmk, ssn_bidx_cmk FROM"),
        "{sql}"
    );
    assert!(
        sql.contains("($1, $2::BYTEA, $3::BYTEA, $4, 0, $10::JSONB, $9::BYTEA)"),
        "{sql}"
    );
    assert!(
        sql.contains("imp_sen (p0, p1, p2, p3, sen_counter, cmk_edek_cmk, ssn_bidx_cmk)"),
        "{sql}"
    );
    assert!(
        sql.contains("(tenant_id, ssn, notes, name, cmk_edek, ssn_bidx)"),
        "{sql}"
    );
}

#[test]
fn other_insert_selects_stay_refused() {
    for sql in [
        "INSERT INTO patients (tenant_id, ssn) SELECT tenant_id, ssn FROM patients",
        "INSERT INTO patients (tenant_id, ssn) SELECT p0, upper(p1) FROM (VALUES ('a', 'b')) AS v(p0, p1)",
        "INSERT INTO patients (tenant_id, ssn) SELECT p0, p1 FROM (VALUES ('a', 'b')) AS v(p0, p1) WHERE p1 > 'a'",
        "INSERT INTO patients (tenant_id, ssn) SELECT p0, p1 FROM (VALUES ('a', 'b')) AS v(p0, p1) ORDER BY p1",
        "INSERT INTO patients (tenant_id, ssn) SELECT DISTINCT p0, p1 FROM (VALUES ('a', 'b')) AS v(p0, p1)",
    ] {
        assert_eq!(rejection(sql).sqlstate, KM003, "{sql}");
    }
}

#[test]
fn whole_row_references_and_function_bodies_are_refused() {
    for sql in [
        "SELECT p FROM patients p",
        "SELECT p::text FROM patients AS p",
        "SELECT row_to_json(patients) FROM patients",
        "SELECT id FROM patients p WHERE p IS NOT NULL",
        "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $$ INSERT INTO patients (tenant_id, ssn) VALUES ('a', 'x') $$",
        "CREATE OR REPLACE PROCEDURE p() LANGUAGE sql AS $$ UPDATE public.patients SET notes = 'x' $$",
    ] {
        refused_saying(sql, "public.patients");
    }
    // Columns, qualified columns, p.* and functions on other tables pass.
    for sql in [
        "SELECT p.id, p.ssn, p.* FROM patients p",
        "SELECT patients.notes FROM patients",
        "CREATE FUNCTION g() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
    ] {
        assert!(analyze(&policy(), sql, 0).is_ok(), "{sql}");
    }
}

#[test]
fn writes_to_a_table_whose_schema_is_wrong_are_refused() {
    let mut facts = SchemaFacts::default();
    facts.unwritable.insert(
        "public.patients".to_owned(),
        "public.patients.notes: has a DEFAULT".to_owned(),
    );
    for sql in [
        "INSERT INTO patients (tenant_id, notes) VALUES ('a', 'x')",
        "UPDATE patients SET notes = 'x' WHERE tenant_id = 'a'",
    ] {
        let refusal = analyze_in(&policy(), &facts, sql, 0).unwrap_err();
        assert_eq!(refusal.sqlstate, KM003);
        assert!(
            refusal.message.contains("has a DEFAULT"),
            "{}",
            refusal.message
        );
    }
    assert!(analyze_in(&policy(), &facts, "SELECT notes FROM patients", 0).is_ok());
}

#[test]
fn a_qualified_star_as_a_value_is_a_whole_row_reference() {
    for sql in [
        "SELECT row_to_json(p.*) FROM patients p",
        "SELECT to_jsonb(patients.*) FROM patients",
        "SELECT json_agg(p.* ORDER BY p.id) FROM patients p",
        "SELECT format('%s', p.*) FROM patients AS p",
    ] {
        refused_saying(sql, "whole-row");
    }
    // In the SELECT list it is every column, each decrypted.
    assert!(analyze(&policy(), "SELECT p.* FROM patients p", 0).is_ok());
    assert!(analyze(&policy(), "SELECT row_to_json(d.*) FROM doctors d", 0).is_ok());
}

#[test]
fn values_derived_from_protected_columns_are_refused_through_any_alias() {
    for sql in [
        "WITH c AS (SELECT id, ssn AS x FROM patients) SELECT id, x::text FROM c",
        "WITH c AS (SELECT id, ssn AS x FROM patients) SELECT id, encode(x, 'hex') FROM c",
        "WITH c AS (SELECT id, ssn AS x FROM patients) SELECT substr(x, 5) FROM c",
        "WITH c AS (SELECT id, ssn AS x FROM patients) SELECT ARRAY[x] FROM c",
        "WITH c (i, x) AS (SELECT id, notes FROM patients) SELECT encode(x, 'base64') FROM c",
        "WITH c AS (SELECT * FROM patients) SELECT encode(ssn, 'hex') FROM c",
        "WITH c AS (SELECT ssn AS x FROM patients), d AS (SELECT x AS y FROM c) \
         SELECT encode(y, 'escape') FROM d",
        "SELECT encode(x, 'hex') FROM (SELECT ssn AS x FROM patients) s",
        "SELECT encode(s.x, 'hex') FROM (SELECT ssn FROM patients) s(x)",
        "SELECT (SELECT x FROM (SELECT ssn AS x FROM patients) s LIMIT 1)",
        "SELECT encode(c, 'hex') FROM patients AS p(i, t, c)",
        "SELECT p.id FROM patients p JOIN patients q USING (ssn)",
        "SELECT id FROM patients NATURAL JOIN (SELECT id, ssn FROM patients) s",
        "SELECT s.id FROM patients p JOIN (SELECT id, ssn AS x FROM patients) s ON s.x = p.ssn",
        "WITH c AS (SELECT id, ssn AS x FROM patients) SELECT id FROM c WHERE x > '\\x00'",
        "WITH c AS (SELECT id, ssn AS x FROM patients) SELECT count(*) FROM c GROUP BY x",
        "SELECT x FROM (SELECT ssn AS x FROM patients) s GROUP BY 1",
        "SELECT id, ssn FROM patients ORDER BY 2",
        "SELECT ssn AS x FROM patients ORDER BY x",
        "SELECT DISTINCT ON (x) x FROM (SELECT ssn AS x FROM patients) s",
        "WITH c AS (SELECT id, ssn AS x FROM patients) SELECT c FROM c",
        "WITH c AS (SELECT id, ssn AS x FROM patients) SELECT row_to_json(c.*) FROM c",
        "SELECT id FROM patients WHERE id IN (SELECT x FROM (SELECT ssn AS x FROM patients) s)",
        "SELECT x FROM (SELECT ssn AS x FROM patients) s UNION SELECT x FROM (SELECT \
         notes AS x FROM patients) t ORDER BY 1",
        "WITH RECURSIVE r (a, b) AS (SELECT ssn, 1 FROM patients UNION ALL \
         SELECT a, b + 1 FROM r WHERE b < 2) SELECT encode(a, 'hex') FROM r",
        "CREATE VIEW v AS SELECT ssn::text AS s, encode(notes, 'base64') AS n FROM patients",
        "CREATE VIEW v AS WITH c AS (SELECT ssn AS x FROM patients) SELECT x::text FROM c",
        "CREATE TABLE t AS SELECT encode(x, 'hex') FROM (SELECT ssn AS x FROM patients) s",
        "UPDATE patients SET notes = NULL FROM (SELECT id AS i, ssn AS x FROM patients) s \
         WHERE s.i = patients.id AND s.x IS NULL",
        "DELETE FROM patients USING (SELECT ssn AS x FROM patients) s WHERE s.x > '\\x00'",
        "INSERT INTO doctors (name) SELECT encode(x, 'hex') FROM (SELECT ssn AS x FROM patients) s",
    ] {
        let refusal = rejection(sql);
        assert_eq!(refusal.sqlstate, KM003, "{sql}: {}", refusal.message);
        assert!(
            refusal.table.as_deref() == Some("public.patients"),
            "{sql}: {refusal:?}"
        );
    }
}

#[test]
fn bare_protected_columns_pass_through_aliases() {
    for sql in [
        "SELECT count(*) FROM patients",
        "SELECT p.ssn, d.name FROM patients p JOIN doctors d ON d.id = p.id ORDER BY 2",
        "SELECT p.ssn FROM patients p JOIN doctors d USING (id)",
        "SELECT DISTINCT ssn FROM patients",
        "CREATE VIEW v AS SELECT id, tenant_id, ssn FROM patients",
        "INSERT INTO patients (id, tenant_id, notes) VALUES (1, 'acme', 'x') \
         ON CONFLICT (id) DO UPDATE SET notes = EXCLUDED.notes RETURNING notes",
    ] {
        if let Err(refusal) = analyze(&policy(), sql, 0) {
            panic!("{sql}: {}", refusal.message);
        }
    }
}

#[test]
fn an_orm_entity_save_that_sets_the_tenant_column_is_pinned_to_that_tenant() {
    // Django's Model.save(): every column, the tenant's included.
    let plan = write_plan(
        "UPDATE \"patients\" SET \"tenant_id\" = $1, \"ssn\" = $2, \"notes\" = $3 \
         WHERE \"patients\".\"id\" = $4",
        4,
    );
    assert_eq!(plan.rows[0].tenant, TenantSource::Param(1));
    assert_eq!(plan.tenant_pin_param, None);
    let sql = plan.statement.to_string();
    assert!(
        sql.contains("WHERE (\"patients\".\"id\" = $4) AND patients.tenant_id = $1"),
        "{sql}"
    );
    // A literal tenant, and the tenant column alone (no protected value).
    let plan = write_plan(
        "UPDATE patients SET tenant_id = 'acme', notes = 'x' WHERE id = 1",
        0,
    );
    assert_eq!(
        plan.rows[0].tenant,
        TenantSource::Literal("acme".to_owned())
    );
    assert!(
        plan.statement
            .to_string()
            .contains("(id = 1) AND patients.tenant_id = 'acme'"),
        "{}",
        plan.statement
    );
    let plan = write_plan("UPDATE patients SET tenant_id = 'acme' WHERE id = 1", 0);
    assert!(plan.rows[0].cells.is_empty());
    assert!(plan
        .statement
        .to_string()
        .contains("patients.tenant_id = 'acme'"));
    // The same tenant in WHERE agrees; an expression is never a tenant.
    write_plan(
        "UPDATE patients SET tenant_id = 'acme', ssn = 'x' WHERE id = 1 AND tenant_id = 'acme'",
        0,
    );
    refused_saying(
        "UPDATE patients SET tenant_id = lower('ACME') WHERE id = 1",
        "a literal or a parameter",
    );
    refused_saying(
        "UPDATE patients SET tenant_id = 'globex' WHERE id = 1 AND tenant_id = 'acme'",
        "moving a row to another tenant",
    );
}

#[test]
fn an_upsert_that_sets_the_tenant_from_excluded_keeps_rows_with_their_tenant() {
    let plan = write_plan(
        "INSERT INTO patients (id, tenant_id, ssn) VALUES (1, 'acme', '123') \
         ON CONFLICT (id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id, ssn = EXCLUDED.ssn",
        0,
    );
    let sql = plan.statement.to_string();
    assert!(
        sql.contains("WHERE patients.tenant_id = excluded.tenant_id"),
        "{sql}"
    );
    refused_saying(
        "INSERT INTO patients (id, tenant_id, ssn) VALUES (1, 'acme', '123') \
         ON CONFLICT (id) DO UPDATE SET tenant_id = 'globex', ssn = EXCLUDED.ssn",
        "moving a row to another tenant",
    );
}

#[test]
fn pg_dumps_qualified_comparisons_are_read_as_postgresql_reads_them() {
    // `pg_dump -t patients` finds the table with this query.
    let lookup = "SELECT c.oid FROM pg_catalog.pg_class c \
        LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
        WHERE c.relkind OPERATOR(pg_catalog.=) ANY (array['r', 'S', 'v', 'm', 'f', 'p']) \
        AND c.relname OPERATOR(pg_catalog.~) '^(patients)$' COLLATE pg_catalog.default \
        AND pg_catalog.pg_table_is_visible(c.oid)";
    let analysis = analyze(&policy(), lookup, 0).expect("pg_dump's table lookup");
    assert!(matches!(
        analysis.statements.as_slice(),
        [StatementPlan::Untouched]
    ));
    // Only tokens are rewritten for sqlparser, never strings or comments.
    assert_eq!(
        super::gate::with_plain_comparisons(
            "SELECT 'OPERATOR(pg_catalog.=) ANY' /* OPERATOR(pg_catalog.<) ALL */ WHERE a OPERATOR(pg_catalog.<>) ALL ($1)"
        )
        .as_deref(),
        Some("SELECT 'OPERATOR(pg_catalog.=) ANY' /* OPERATOR(pg_catalog.<) ALL */ WHERE a  <>  ALL ($1)")
    );
    assert_eq!(
        super::gate::with_plain_comparisons("SELECT a OPERATOR(public.=) ANY ($1)"),
        None
    );
    // On a protected column it is still a condition on it.
    refused_saying(
        "SELECT id FROM patients WHERE birth_date OPERATOR(pg_catalog.=) ANY (array['2000-01-01'::date])",
        "condition",
    );
}
