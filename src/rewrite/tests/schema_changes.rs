//! Unit tests: DDL, partitions and casts that could move names or tenant
//! values away from the data the policy protects.

use super::super::*;
use super::{policy, refused_saying, rejection, write_plan};

#[test]
fn statements_after_ddl_on_protected_data_wait_for_the_new_catalog() {
    for sql in [
        "CREATE VIEW v AS SELECT * FROM patients; INSERT INTO v (tenant_id, ssn) VALUES ('acme', 'x')",
        "ALTER TABLE patients RENAME TO p2; INSERT INTO p2 (tenant_id, ssn) VALUES ('acme', 'x')",
    ] {
        assert_eq!(rejection(sql).sqlstate, KM003, "{sql}");
    }
    // DDL elsewhere, or DDL alone, is not held up.
    for sql in [
        "CREATE TABLE log (m text); INSERT INTO log VALUES ('x')",
        "CREATE VIEW v AS SELECT id FROM patients; CREATE VIEW w AS SELECT id FROM patients",
    ] {
        assert!(analyze(&policy(), sql, 0).is_ok(), "{sql}");
    }
}

#[test]
fn statements_naming_a_partition_of_a_protected_table_are_refused() {
    let mut facts = SchemaFacts::default();
    facts.children.insert(
        "public.patients_2024".to_owned(),
        "public.patients".to_owned(),
    );
    for sql in [
        "INSERT INTO patients_2024 (tenant_id, ssn) VALUES ('acme', '123-45-6789')",
        "SELECT ssn FROM public.patients_2024",
        "UPDATE patients_2024 SET notes = 'x'",
    ] {
        let refusal = analyze_in(&policy(), &facts, sql, 0).unwrap_err();
        assert_eq!(refusal.sqlstate, KM003, "{sql}");
        assert_eq!(refusal.table.as_deref(), Some("public.patients"));
    }
    assert!(analyze_in(&policy(), &facts, "DROP TABLE patients_2024", 0).is_ok());
    // A partition in another schema, reached by its bare name through the
    // search_path (review finding: it was looked up in public only).
    let mut facts = SchemaFacts::default();
    facts
        .children
        .insert("app.patients_2025".to_owned(), "public.patients".to_owned());
    // A child that shares the policy table's bare name (schema per tenant)
    // does not make the policy table itself unusable.
    facts
        .children
        .insert("acme.patients".to_owned(), "public.patients".to_owned());
    assert!(analyze_in(&policy(), &facts, "SELECT ssn FROM patients", 0).is_ok());
    assert!(analyze_in(&policy(), &facts, "SELECT ssn FROM acme.patients", 0).is_err());
    for sql in [
        "INSERT INTO patients_2025 (tenant_id, ssn) VALUES ('acme', '123-45-6789')",
        "UPDATE patients_2025 SET ssn = '123-45-6789' WHERE id = 1",
        "SELECT * FROM app.patients_2025",
    ] {
        let refusal = analyze_in(&policy(), &facts, sql, 0).unwrap_err();
        assert_eq!(refusal.sqlstate, KM003, "{sql}");
    }
}

#[test]
fn alter_table_that_moves_names_away_from_the_data_is_refused() {
    for (sql, column, what) in [
        (
            "ALTER TABLE patients RENAME TO patients_old",
            None,
            "renaming a policy table",
        ),
        (
            "ALTER TABLE public.patients RENAME COLUMN ssn TO ssn_plain",
            Some("ssn"),
            "renaming",
        ),
        (
            "ALTER TABLE patients RENAME COLUMN legacy TO notes",
            Some("notes"),
            "renaming",
        ),
        (
            "ALTER TABLE patients RENAME COLUMN cmk_edek TO keys",
            Some("cmk_edek"),
            "renaming",
        ),
        (
            "ALTER TABLE patients ALTER COLUMN notes TYPE text",
            Some("notes"),
            "type",
        ),
        (
            "ALTER TABLE patients ALTER COLUMN tenant_id SET DEFAULT 'acme'",
            Some("tenant_id"),
            "default",
        ),
        (
            "ALTER TABLE patients DROP COLUMN x, DROP COLUMN cmk_edek",
            Some("cmk_edek"),
            "dropping",
        ),
        (
            "ALTER TABLE patients DROP COLUMN ssn_bidx",
            Some("ssn_bidx"),
            "dropping",
        ),
    ] {
        let refusal = refused_saying(sql, what);
        assert_eq!(refusal.table.as_deref(), Some("public.patients"), "{sql}");
        assert_eq!(refusal.column.as_deref(), column, "{sql}");
        assert!(
            refusal.message.contains("directly in PostgreSQL"),
            "{}",
            refusal.message
        );
    }
    // A default on a protected column was refused before (the server would
    // store it unencrypted).
    let default = rejection("ALTER TABLE patients ALTER COLUMN notes SET DEFAULT '\\x00'::bytea");
    assert_eq!(
        (default.sqlstate, default.column.as_deref()),
        (KM003, Some("notes"))
    );
    // Forms sqlparser does not read (SET SCHEMA, PostgreSQL's ATTACH
    // PARTITION … FOR VALUES) are refused as unparseable SQL that names
    // protected data.
    for sql in [
        "ALTER TABLE patients SET SCHEMA archive",
        "ALTER TABLE patients ATTACH PARTITION patients_2020 FOR VALUES IN ('acme')",
    ] {
        assert_eq!(rejection(sql).sqlstate, KM003, "{sql}");
    }
    // The rest of the DBA's work passes, planned as DDL.
    for sql in [
        "ALTER TABLE patients ADD COLUMN visits int",
        "ALTER TABLE patients ALTER COLUMN ssn SET NOT NULL",
        "ALTER TABLE patients ALTER COLUMN visits TYPE bigint",
        "ALTER TABLE patients RENAME COLUMN visits TO visit_count",
        "ALTER TABLE patients DROP COLUMN visits",
        "ALTER TABLE patients ADD CONSTRAINT envelope CHECK (notes IS NULL OR substr(notes, 1, 4) = '\\x434d4b01'::bytea)",
        "ALTER TABLE doctors RENAME TO physicians",
    ] {
        let a = analyze(&policy(), sql, 0).unwrap_or_else(|r| panic!("{sql}: {}", r.message));
        assert!(matches!(a.statements[..], [StatementPlan::Ddl]), "{sql}");
    }
}

#[test]
fn a_cast_that_could_change_the_tenant_value_makes_it_unknown() {
    // The server stores 'acme-corp'::varchar(4) as 'acme': sealing under
    // acme-corp would put its cells into acme's rows.
    let refusal = rejection(
        "INSERT INTO patients (tenant_id, ssn) VALUES ('acme-corp'::varchar(4), '123-45-6789')",
    );
    assert_eq!(refusal.sqlstate, KM004, "{}", refusal.message);
    let refusal = rejection(
        "INSERT INTO patients (tenant_id, ssn) SELECT v.t::varchar(4), v.s FROM (VALUES ('acme-corp', 'x')) AS v(t, s)",
    );
    assert_eq!(refusal.sqlstate, KM003, "{}", refusal.message);
    let update = write_plan(
        "UPDATE patients SET ssn = 'x' WHERE tenant_id = 'acme-corp'::char(4) AND id = 17",
        0,
    );
    assert!(
        !matches!(&update.rows[0].tenant, TenantSource::Literal(t) if t == "acme-corp"),
        "{:?}",
        update.rows[0].tenant
    );
    for sql in [
        "INSERT INTO patients (tenant_id, ssn) VALUES ('acme-corp'::char(4), 'x')",
        "INSERT INTO patients (tenant_id, ssn) VALUES ('acme-corp'::bpchar(4), 'x')",
        "INSERT INTO patients (tenant_id, ssn) VALUES ('acme-corp'::name, 'x')",
    ] {
        assert_eq!(rejection(sql).sqlstate, KM004, "{sql}");
    }
    let typed = write_plan(
        "INSERT INTO patients (tenant_id, ssn) VALUES ('42'::INTEGER, 'x'), ($1::uuid, 'y')",
        1,
    );
    assert!(matches!(&typed.rows[0].tenant, TenantSource::Literal(t) if t == "42"));
    assert!(matches!(&typed.rows[1].tenant, TenantSource::Param(1)));
    // Casts that keep the text as it is still name the tenant.
    for sql in [
        "INSERT INTO patients (tenant_id, ssn) VALUES ('acme'::text, 'x')",
        "INSERT INTO patients (tenant_id, ssn) VALUES (('acme')::varchar, 'x')",
        "INSERT INTO patients (tenant_id, ssn) SELECT v.t::VARCHAR, v.s FROM (VALUES ('acme', 'x')) AS v(t, s)",
        "UPDATE patients SET ssn = 'x' WHERE tenant_id = 'acme'::text AND id = 17",
        // As ORMs write a typed tenant (SQLAlchemy's render_bind_cast,
        // insertmanyvalues): the column's own input, nothing cut.
        "INSERT INTO patients (tenant_id, ssn) SELECT p0::VARCHAR, p1::VARCHAR FROM (VALUES ('acme', 'x')) AS imp_sen(p0, p1)",
    ] {
        let plan = write_plan(sql, 0);
        assert!(
            matches!(&plan.rows[0].tenant, TenantSource::Literal(t) if t == "acme"),
            "{sql}: {:?}",
            plan.rows[0].tenant
        );
    }
}

#[test]
fn ddl_that_puts_a_policy_name_on_other_data_or_hooks_a_policy_table_is_refused() {
    for sql in [
        "ALTER TABLE staging RENAME TO patients",
        "ALTER TABLE public.staging RENAME TO patients",
        "ALTER SCHEMA public RENAME TO old_public",
        "CREATE TRIGGER t BEFORE INSERT OR UPDATE ON patients FOR EACH ROW EXECUTE FUNCTION f()",
        "CREATE TABLE patients AS SELECT * FROM staging",
        "SELECT * INTO patients FROM staging",
        "ALTER TABLE patients ADD COLUMN notes bytea DEFAULT convert_to('x', 'UTF8')",
        "ALTER TABLE patients ADD COLUMN ssn_bidx bytea GENERATED ALWAYS AS (ssn) STORED",
    ] {
        let refusal = refused_saying(sql, "directly in PostgreSQL");
        assert_eq!(refusal.table.as_deref(), Some("public.patients"), "{sql}");
    }
    for sql in [
        "ALTER TABLE staging RENAME TO staging_old",
        "ALTER SCHEMA archive RENAME TO archive_old",
        "CREATE TRIGGER t BEFORE INSERT ON doctors FOR EACH ROW EXECUTE FUNCTION f()",
        "CREATE TABLE copy AS SELECT id FROM patients",
        "SELECT id INTO copy FROM patients",
        "ALTER TABLE patients ADD COLUMN notes bytea",
        "ALTER TABLE patients ADD COLUMN visits int DEFAULT 0",
    ] {
        assert!(
            analyze(&policy(), sql, 0).is_ok(),
            "{sql}: {:?}",
            analyze(&policy(), sql, 0).err().map(|r| r.message)
        );
    }
}
