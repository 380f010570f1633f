//! Unit tests: the tenant setting in its spellings and scopes, and the
//! refusals of statements the proxy cannot plan safely.

use super::super::*;
use super::{policy, refused_saying, rejection, write_plan};
use crate::config::parse_policy;

#[test]
fn tenant_changes_local_reset_and_discard() {
    let change = |sql: &str| match analyze(&policy(), sql, 0).unwrap().statements.pop() {
        Some(StatementPlan::SetTenant(change)) => change,
        other => panic!("{sql}: {other:?}"),
    };
    assert_eq!(
        change("SET LOCAL cmk.tenant_id = 'acme'"),
        TenantChange::to(Some("acme".into()), true)
    );
    for sql in [
        "RESET cmk.tenant_id",
        "reset all",
        "DISCARD ALL",
        "RESET ALL; SELECT 1",
        "RESET/**/cmk.tenant_id",
        "RESET -- the tenant\ncmk.tenant_id",
        "reset \"cmk.tenant_id\"",
        "SET cmk.tenant_id TO DEFAULT",
    ] {
        assert_eq!(change(sql), TenantChange::reset(false), "{sql}");
    }
    assert_eq!(
        change("SET cmk.tenant_id = ''"),
        TenantChange::to(None, false)
    );
    // SQL the parser cannot read that names the setting may set it: refused
    // (the proxy would not follow the change). Without the setting it passes.
    for sql in [
        "SET cmk.tenant_id = 'globex'; ABORT",
        "ABORT; SELECT set_config('cmk.tenant_id', 'globex', false)",
    ] {
        refused_saying(sql, "cannot parse names the tenant setting");
    }
    // A body that sets the tenant (a DO block, a function) would change it
    // where the proxy cannot follow.
    for sql in [
        "DO $$BEGIN SET cmk.tenant_id = 'globex'; END$$",
        "DO $$BEGIN PERFORM set_config('cmk.tenant_id', 'globex', false); END$$",
        "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $$ SET cmk.tenant_id = 'globex' $$",
        "CREATE PROCEDURE p() LANGUAGE sql AS $$ UPDATE pg_settings SET setting = 'x' $$",
    ] {
        refused_saying(sql, "names the tenant setting");
    }
    refused_saying("PREPARE TRANSACTION 'x'", "PREPARE TRANSACTION");
    // ABORT (which sqlparser does not parse) is a ROLLBACK wherever it is.
    let aborts = analyze(&policy(), "SELECT 1; ABORT", 0).unwrap();
    assert!(
        matches!(&aborts.statements[..], [StatementPlan::Untouched, StatementPlan::SetTenant(c)] if c.savepoint == Some(SavepointOp::Rollback)),
        "{aborts:?}"
    );
    // Transaction ends are points the tenant tracking settles at.
    for (sql, op) in [
        ("COMMIT", SavepointOp::Commit),
        ("END", SavepointOp::Commit),
        ("COMMIT AND CHAIN", SavepointOp::Commit),
        ("ROLLBACK", SavepointOp::Rollback),
        ("ROLLBACK AND CHAIN", SavepointOp::Rollback),
        ("ABORT", SavepointOp::Rollback),
        ("abort work and no chain;", SavepointOp::Rollback),
    ] {
        let analysis = analyze(&policy(), sql, 0).unwrap();
        assert!(
            matches!(&analysis.statements[..], [StatementPlan::SetTenant(c)] if c.savepoint == Some(op.clone())),
            "{sql}: {analysis:?}"
        );
    }
    // A comment marker inside a string literal is no comment; a reset
    // among other statements on the setting cannot be attributed: refused.
    for sql in [
        "SELECT '--'; RESET cmk.tenant_id",
        "SELECT '/*'; RESET cmk.tenant_id",
        "RESET ALL; SET cmk.tenant_id = 'globex'",
        "SET cmk.tenant_id = 'globex'; RESET ALL",
    ] {
        let refused = analyze(&policy(), sql, 0);
        let is_reset = matches!(&refused, Ok(a) if matches!(a.statements[..], [StatementPlan::SetTenant(ref c)] if *c == TenantChange::reset(false)));
        assert!(
            is_reset || refused.as_ref().is_err_and(|r| r.sqlstate == KM003),
            "{sql}: {refused:?}"
        );
    }
    assert_eq!(
        rejection("RESET ALL; SET cmk.tenant_id = 'globex'").sqlstate,
        KM003
    );
    // Unparseable SQL that names the setting, even inside a string, is
    // refused (a DO body is a string too); without it, it passes.
    refused_saying(
        "SELECT 'reset cmk.tenant_id' FROM x WHERE (",
        "names the tenant setting",
    );
    let untouched = analyze(&policy(), "SELECT 'reset' FROM x WHERE (", 0).unwrap();
    assert!(matches!(
        untouched.statements[..],
        [StatementPlan::Untouched]
    ));
    // Values the proxy could misread are refused, not taken as "no tenant"
    // while the server has one.
    for sql in [
        "SET cmk.tenant_id = E'globex'",
        "SET cmk.tenant_id = $$globex$$",
        "SET cmk.tenant_id = +5",
        "SET cmk.tenant_id = 'a', 'b'",
    ] {
        refused_saying(sql, "SET cmk.tenant_id = '<tenant>'");
    }
}

#[test]
fn data_modifying_statements_inside_queries_are_refused() {
    for sql in [
        "WITH c AS (SELECT 1) INSERT INTO patients (tenant_id, ssn) VALUES ('acme', '123-45-6789')",
        "WITH c AS (SELECT 1) UPDATE patients SET ssn = '123-45-6789' WHERE id = 1",
        "WITH c AS (INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'plain') RETURNING id) SELECT * FROM c",
        "WITH c AS (DELETE FROM patients RETURNING notes) SELECT 1",
    ] {
        refused_saying(sql, "data-modifying");
    }
    // On other tables they pass.
    let plain = analyze(
        &policy(),
        "WITH c AS (INSERT INTO log (m) VALUES ('x') RETURNING id) SELECT * FROM c",
        0,
    )
    .unwrap();
    assert!(matches!(plain.statements[..], [StatementPlan::Untouched]));
}

#[test]
fn updating_pg_settings_is_refused() {
    // It can set the tenant to a value the proxy would have to evaluate.
    for sql in [
        "UPDATE pg_catalog.pg_settings SET setting = 'globex' WHERE name = 'cmk.tenant_id'",
        "UPDATE pg_settings SET setting = 'on' WHERE name = 'enable_seqscan'",
    ] {
        refused_saying(sql, "UPDATE pg_settings");
    }
}

#[test]
fn unparseable_sql_naming_a_protected_view_or_a_unicode_escaped_name_is_refused() {
    let mut facts = SchemaFacts::default();
    facts
        .views
        .insert("public.patient_notes".to_owned(), vec!["memo".to_owned()]);
    let refusal = analyze_in(
        &policy(),
        &facts,
        "UPDATE patient_notes SET memo = 'plain' WHERE id = 1 !!! garbage",
        0,
    )
    .unwrap_err();
    assert_eq!(refusal.sqlstate, KM003);
    assert_eq!(refusal.table.as_deref(), Some("public.patient_notes"));
    let refusal =
        rejection("INSERT INTO U&\"p\\0061tients\" (tenant_id, ssn) VALUES ('acme', 'x')");
    assert_eq!(refusal.sqlstate, KM003, "{}", refusal.message);
}

#[test]
fn backslashes_under_nonstandard_strings_are_refused_near_protected_names() {
    let facts = SchemaFacts::default();
    let refused = |sql: &str| nonstandard_strings_refusal(&policy(), &facts, sql);
    let r = refused("INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'a\\', 'b')").unwrap();
    assert_eq!(
        (r.sqlstate, r.table.as_deref()),
        (KM003, Some("public.patients"))
    );
    assert!(refused("SELECT set_config('cmk.tenant_id', 'a\\', false)").is_some());
    assert!(refused("INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'ok')").is_none());
    assert!(refused("SELECT 'a\\b' FROM other").is_none());
    // With strings nonstandard, `'a\\'` does not end at its second quote:
    // the name spelled with escapes after it must not go unseen.
    assert!(refused(
        "SELECT 'a\\' , $$' ; INSERT INTO U&\"p\\0061tients\" (tenant_id, ssn) VALUES (1, 2) --' $$"
    )
    .is_some());
}

#[test]
fn literals_read_the_same_whatever_standard_conforming_strings() {
    assert_eq!(quote_literal("it's"), "'it''s'");
    assert_eq!(quote_literal("a\\b'c"), "E'a\\\\b''c'");
}

#[test]
fn explain_and_cursors_are_planned_by_what_they_run() {
    for sql in [
        "EXPLAIN ANALYZE INSERT INTO patients (tenant_id, ssn) VALUES ('acme', '123-45-6789')",
        "EXPLAIN UPDATE patients SET ssn = '123-45-6789' WHERE id = 1",
        "EXPLAIN SELECT * FROM patients WHERE notes = '123-45-6789'",
        "DECLARE c CURSOR FOR SELECT * FROM patients WHERE notes = '123-45-6789'",
    ] {
        assert_eq!(rejection(sql).sqlstate, KM003, "{sql}");
    }
    for sql in [
        "EXPLAIN ANALYZE SELECT ssn FROM patients WHERE id = 1",
        "DECLARE c CURSOR FOR SELECT ssn FROM patients",
    ] {
        let plan = analyze(&policy(), sql, 0).unwrap();
        assert!(
            matches!(plan.statements[..], [StatementPlan::Read]),
            "{sql}"
        );
    }
}

#[test]
fn unqualified_names_find_policy_tables_in_other_schemas() {
    let policy = parse_policy(
        "tables:\n  app.patients:\n    tenant_column: tenant_id\n    columns:\n      notes: {type: text}\n",
        "test",
    )
    .unwrap();
    let plan = analyze(
        &policy,
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'x')",
        0,
    )
    .unwrap();
    match &plan.statements[..] {
        [StatementPlan::Write(write)] => assert_eq!(write.table, "app.patients"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn writes_stay_in_their_tenant_s_rows() {
    // ON CONFLICT: the conflicting row must be the proposed row's tenant's.
    let plan = write_plan(
        "INSERT INTO patients (id, tenant_id, notes) VALUES (1, 'acme', 'x') ON CONFLICT (id) DO UPDATE SET notes = EXCLUDED.notes WHERE patients.id > 0",
        0,
    );
    let sql = plan.statement.to_string();
    assert!(
        sql.contains("WHERE (patients.id > 0) AND patients.tenant_id = excluded.tenant_id"),
        "{sql}"
    );
    assert_eq!(
        rejection("INSERT INTO patients (id, tenant_id, notes) VALUES (1, 'acme', 'x') ON CONFLICT (id) DO UPDATE SET notes = EXCLUDED.notes, tenant_id = 'globex'").sqlstate,
        KM003
    );
    // UPDATE … FROM: another table's tenant column does not name the row's.
    let plan = write_plan(
        "UPDATE patients SET notes = 'x' FROM tenants t WHERE t.tenant_id = 'acme' AND patients.id = 1",
        0,
    );
    assert!(plan.tenant_pin_param.is_some());
    let plan = write_plan(
        "UPDATE patients p SET notes = 'x' WHERE p.tenant_id = 'acme' AND p.id = 1",
        0,
    );
    assert_eq!(plan.tenant_pin_param, None);
    assert_eq!(plan.rows[0].tenant, TenantSource::Literal("acme".into()));
    // INSERT without the tenant column: the proxy names the session's.
    let plan = write_plan("INSERT INTO patients (notes) VALUES ('x'), ('y')", 0);
    let pin = plan.tenant_pin_param.expect("a tenant parameter");
    assert_eq!(
        plan.statement.to_string(),
        format!(
            "INSERT INTO patients (notes, cmk_edek, tenant_id) VALUES ($1::BYTEA, $2::JSONB, ${pin}), ($3::BYTEA, $4::JSONB, ${pin})"
        )
    );
    let nothing_sealed = write_plan("INSERT INTO patients (notes) VALUES (NULL)", 0);
    assert_eq!(nothing_sealed.tenant_pin_param, None);
}

#[test]
fn the_tenant_setting_is_followed_in_every_spelling_or_refused() {
    let plan = analyze(&policy(), "SET \"CMK\".tenant_id = 'acme'", 0).unwrap();
    assert!(
        matches!(&plan.statements[..], [StatementPlan::SetTenant(c)] if c.tenant.as_deref() == Some("acme")),
        "{:?}",
        plan.statements
    );
    for sql in [
        "SELECT set_config(E'cmk.tenant_id', 'globex', false)",
        "SELECT set_config('cmk.tenant_id'::text, 'globex', false)",
        "SELECT set_config($1, $2, false)",
    ] {
        assert_eq!(
            analyze(&policy(), sql, 2).unwrap_err().sqlstate,
            KM003,
            "{sql}"
        );
    }
}

#[test]
fn expressions_that_would_show_or_copy_ciphertext_are_refused() {
    for sql in [
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'x') RETURNING encode(notes, 'hex')",
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'x') RETURNING ssn::text",
        "INSERT INTO patients (id, tenant_id, notes) VALUES (1, 'acme', 'x') ON CONFLICT (id) DO UPDATE SET notes = EXCLUDED.notes WHERE patients.ssn = 'y'",
        "INSERT INTO patients (id, tenant_id) VALUES (1, 'acme') ON CONFLICT (id) DO UPDATE SET (ssn, id) = ('plain', 2)",
        "INSERT INTO patients (id, tenant_id) VALUES (1, 'acme') ON CONFLICT (id) DO UPDATE SET ssn = 'plain'",
        "INSERT INTO patients (id, tenant_id, notes) VALUES (1, 'acme', 'x') ON CONFLICT (id) DO UPDATE SET notes = EXCLUDED.notes, (ssn, id) = ('plain', 2)",
        "UPDATE patients SET tenant_id = encode(ssn, 'hex') WHERE id = 1",
    ] {
        assert_eq!(rejection(sql).sqlstate, KM003, "{sql}");
    }
    // Bare columns stay allowed where they are decrypted or stay sealed.
    for sql in [
        "INSERT INTO patients (tenant_id, notes) VALUES ('acme', 'x') RETURNING id, notes",
        "UPDATE patients SET notes = 'y' WHERE id = 1 AND tenant_id = 'acme'",
    ] {
        assert!(analyze(&policy(), sql, 0).is_ok(), "{sql}");
    }
}

#[test]
fn a_reset_word_does_not_wave_unparseable_sql_through() {
    for sql in [
        "DO $$BEGIN INSERT INTO patients (tenant_id, ssn) VALUES ('acme', 'x'); END$$ -- reset all",
        "RESET ALL; INSERT INTO patients (tenant_id, ssn) VALUES ('acme', 'x')",
    ] {
        assert_eq!(rejection(sql).sqlstate, KM003, "{sql}");
    }
}

#[test]
fn tenant_and_managed_columns_are_not_assigned_by_other_forms() {
    for sql in [
        "UPDATE patients SET (tenant_id) = ROW('globex') WHERE id = 1",
        "UPDATE patients SET (cmk_edek, id) = ('{}', 1) WHERE id = 1",
        "INSERT INTO patients (tenant_id, id) VALUES ('globex', 1) ON CONFLICT (id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id",
    ] {
        assert_eq!(rejection(sql).sqlstate, KM003, "{sql}");
    }
}

#[test]
fn an_unqualified_name_of_several_policy_tables_is_refused() {
    let policy = parse_policy(
        "tables:\n  public.patients:\n    tenant_column: tenant_id\n    columns:\n      notes: {type: text}\n  billing.patients:\n    tenant_column: tenant_id\n    columns:\n      card: {type: text}\n",
        "test",
    )
    .unwrap();
    let refusal = analyze(
        &policy,
        "INSERT INTO patients (tenant_id, card) VALUES ('acme', '4111')",
        0,
    )
    .unwrap_err();
    assert_eq!(refusal.sqlstate, KM003, "{}", refusal.message);
    assert!(analyze(
        &policy,
        "INSERT INTO billing.patients (tenant_id, card) VALUES ('acme', '4111')",
        0
    )
    .is_ok());
}

#[test]
fn tenant_values_and_hidden_set_config_calls_read_as_the_server_reads_them() {
    let tenant = |sql: &str| match analyze(&policy(), sql, 0).unwrap().statements.pop() {
        Some(StatementPlan::SetTenant(change)) => change.tenant,
        other => panic!("{sql}: {other:?}"),
    };
    assert_eq!(tenant("SET cmk.tenant_id = ACME").as_deref(), Some("acme"));
    assert_eq!(tenant("SET cmk.tenant_id = 0042").as_deref(), Some("42"));
    assert_eq!(tenant("SET cmk.tenant_id = 1.50").as_deref(), Some("1.50"));
    for sql in [
        "SELECT * FROM set_config('cmk.tenant_id', 'globex', false)",
        "SELECT set_config('cmk.tenant_id', 'globex', false) FETCH FIRST 0 ROWS ONLY",
        "SELECT id FROM patients WHERE U&\"\\0073sn\" = 'x'",
    ] {
        assert_eq!(rejection(sql).sqlstate, KM003, "{sql}");
    }
}
