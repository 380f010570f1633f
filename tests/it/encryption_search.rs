//! Equality search through the blind index (issue 16, point 1): lookups on
//! `search: equality` columns return exactly the rows PostgreSQL returns
//! for the same query on the plaintext (of the lookup's tenant), in both
//! protocols, with text, binary and array parameters; what cannot be
//! answered exactly is refused; the index is used; a unique index on
//! (tenant, blind index) enforces per-tenant uniqueness.

use tokio_postgres::types::ToSql;

use crate::common;

use common::encryption::{count, keyring, poll_until, rows, EncryptedSetup};

const SCHEMA: &str = "CREATE TABLE patients (id int PRIMARY KEY, tenant_id text NOT NULL, \
    ssn bytea, ssn_bidx bytea, mrn bytea, mrn_bidx bytea, notes bytea, cmk_edek jsonb, \
    CONSTRAINT cmk_bidx_ssn CHECK ((ssn IS NULL) = (ssn_bidx IS NULL)), \
    CONSTRAINT cmk_bidx_mrn CHECK ((mrn IS NULL) = (mrn_bidx IS NULL))); \
    CREATE INDEX patients_ssn_lookup ON patients (tenant_id, ssn_bidx); \
    CREATE TABLE plain (id int PRIMARY KEY, tenant_id text NOT NULL, ssn text, mrn int8, notes text)";

const COLUMNS: &[&str] = &[
    "ssn: {type: text, search: equality}",
    "mrn: {type: int8, search: equality}",
    "notes: {type: text}",
];

/// A row of the test data: id, tenant, ssn, mrn, notes.
type Row = (
    i32,
    &'static str,
    Option<&'static str>,
    Option<i64>,
    &'static str,
);

/// Values shared across tenants, NULLs, and strings that differ only in
/// case or trailing space.
const ROWS: &[Row] = &[
    (1, "acme", Some("111-11-1111"), Some(10), "a1"),
    (2, "acme", Some("222-22-2222"), Some(20), "a2"),
    (3, "acme", None, None, "a3"),
    (4, "acme", Some("Ab "), Some(10), "a4"),
    (5, "globex", Some("111-11-1111"), Some(10), "g5"),
    (6, "globex", Some("333-33-3333"), None, "g6"),
    (7, "acme", Some("ab"), Some(-7), "a7"),
];

const PLAINTEXT_AT_REST: &str = "SELECT count(*) FROM patients WHERE \
    (ssn IS NOT NULL AND substr(ssn, 1, 4) <> '\\x434d4b01'::bytea) OR \
    (mrn IS NOT NULL AND substr(mrn, 1, 4) <> '\\x434d4b01'::bytea)";

async fn load(setup: &EncryptedSetup, app: &tokio_postgres::Client) {
    for (id, tenant, ssn, mrn, notes) in ROWS {
        app.execute(
            "INSERT INTO patients (id, tenant_id, ssn, mrn, notes) VALUES ($1, $2, $3, $4, $5)",
            &[id, tenant, ssn, mrn, notes],
        )
        .await
        .unwrap();
        setup
            .direct
            .execute(
                "INSERT INTO plain (id, tenant_id, ssn, mrn, notes) VALUES ($1, $2, $3, $4, $5)",
                &[id, tenant, ssn, mrn, notes],
            )
            .await
            .unwrap();
    }
}

/// The rows of `sql` through the proxy, and of the same SQL on the
/// plaintext table directly (with `tenant` pinned there), sorted.
async fn both(
    setup: &EncryptedSetup,
    app: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    tenant: &str,
) -> (Vec<String>, Vec<String>) {
    let render = |rows: Vec<tokio_postgres::Row>| {
        let mut out: Vec<String> = rows
            .iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| match *r.columns()[i].type_() {
                        tokio_postgres::types::Type::INT4 => {
                            r.get::<_, Option<i32>>(i).map(|v| v.to_string())
                        }
                        tokio_postgres::types::Type::INT8 => {
                            r.get::<_, Option<i64>>(i).map(|v| v.to_string())
                        }
                        _ => r.get::<_, Option<String>>(i),
                    })
                    .map(|v| v.unwrap_or_else(|| "NULL".into()))
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect();
        out.sort();
        out
    };
    let through = app
        .query(sql, params)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    let plain_sql = sql
        .replace(
            "FROM patients p",
            "FROM (SELECT * FROM plain WHERE tenant_id = 'TENANT') p",
        )
        .replace(
            "FROM patients",
            "FROM (SELECT * FROM plain WHERE tenant_id = 'TENANT') patients",
        )
        .replace("TENANT", tenant);
    let direct = setup
        .direct
        .query(&plain_sql, params)
        .await
        .unwrap_or_else(|e| panic!("{plain_sql}: {e:?}"));
    (render(through), render(direct))
}

#[tokio::test(flavor = "multi_thread")]
async fn lookups_return_exactly_the_rows_postgresql_returns_on_the_plaintext() {
    let setup = EncryptedSetup::start(SCHEMA, "public.patients", COLUMNS).await;
    let app = setup.app().await;
    load(&setup, &app).await;
    assert_eq!(count(&setup.direct, PLAINTEXT_AT_REST).await, 0);

    app.batch_execute("SET cmk.tenant_id = 'acme'")
        .await
        .unwrap();
    let ssn = "111-11-1111";
    let missing = "999-99-9999";
    let ssns = vec!["111-11-1111".to_owned(), "ab".to_owned()];
    let mrns: Vec<i64> = vec![10, -7];
    let cases: Vec<(&str, Vec<&(dyn ToSql + Sync)>)> = vec![
        (
            "SELECT id, ssn FROM patients WHERE ssn = '111-11-1111'",
            vec![],
        ),
        ("SELECT id, ssn FROM patients WHERE ssn = $1", vec![&ssn]),
        ("SELECT id FROM patients WHERE ssn = $1", vec![&missing]),
        (
            "SELECT id, notes FROM patients WHERE mrn = $1",
            vec![&10i64],
        ),
        ("SELECT id FROM patients WHERE mrn = -7", vec![]),
        (
            "SELECT id, ssn FROM patients WHERE ssn IN ('ab', 'Ab ', '222-22-2222')",
            vec![],
        ),
        (
            "SELECT id FROM patients WHERE ssn NOT IN ('ab', '222-22-2222')",
            vec![],
        ),
        ("SELECT id FROM patients WHERE ssn = ANY($1)", vec![&ssns]),
        ("SELECT id FROM patients WHERE mrn = ANY($1)", vec![&mrns]),
        (
            "SELECT id FROM patients WHERE ssn = ANY(ARRAY['ab', $1])",
            vec![&ssn],
        ),
        ("SELECT id FROM patients WHERE ssn <> 'ab'", vec![]),
        ("SELECT id FROM patients WHERE ssn IS NULL", vec![]),
        (
            "SELECT id FROM patients WHERE ssn IS NOT NULL AND mrn = 10",
            vec![],
        ),
        ("SELECT id FROM patients WHERE ssn = 'ab' OR id = 2", vec![]),
        (
            "SELECT id FROM patients WHERE (ssn = 'ab' OR mrn = 20) AND id > 0",
            vec![],
        ),
        (
            "SELECT p.id, p.ssn FROM patients p WHERE p.ssn = $1 LIMIT 21",
            vec![&ssn],
        ),
        (
            "SELECT id FROM patients WHERE id IN (SELECT id FROM patients WHERE ssn = 'ab')",
            vec![],
        ),
        (
            "WITH hit AS (SELECT id FROM patients WHERE mrn = 10) SELECT id FROM hit",
            vec![],
        ),
    ];
    for (sql, params) in &cases {
        let (through, direct) = both(&setup, &app, sql, params, "acme").await;
        assert_eq!(through, direct, "{sql}");
    }
    // The simple protocol: literals only.
    for (sql, params) in &cases {
        if !params.is_empty() {
            continue;
        }
        let through = rows(&app, sql).await;
        let (_, direct) = both(&setup, &app, sql, &[], "acme").await;
        assert_eq!(through.len(), direct.len(), "{sql}");
    }

    // Another tenant's equal value is not found under this one.
    app.batch_execute("SET cmk.tenant_id = 'globex'")
        .await
        .unwrap();
    let found = rows(&app, "SELECT id FROM patients WHERE ssn = '111-11-1111'").await;
    assert_eq!(found, vec![vec![Some("5".to_owned())]]);

    // No session tenant: a tenant conjunct names it, else KM004.
    app.batch_execute("RESET cmk.tenant_id").await.unwrap();
    let found = rows(
        &app,
        "SELECT id FROM patients WHERE tenant_id = 'acme' AND ssn = '111-11-1111'",
    )
    .await;
    assert_eq!(found, vec![vec![Some("1".to_owned())]]);
    let found = app
        .query(
            "SELECT id FROM patients WHERE ssn = $2 AND tenant_id = $1",
            &[&"globex", &ssn],
        )
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].get::<_, i32>(0), 5);
    let err = app
        .query("SELECT id FROM patients WHERE ssn = $1", &[&ssn])
        .await
        .unwrap_err();
    assert_eq!(common::sqlstate(&err).as_deref(), Some("KM004"), "{err}");
    // A tenant conjunct that disagrees with the session tenant.
    app.batch_execute("SET cmk.tenant_id = 'acme'")
        .await
        .unwrap();
    let err = app
        .simple_query("SELECT id FROM patients WHERE tenant_id = 'globex' AND ssn = 'x'")
        .await
        .unwrap_err();
    assert_eq!(common::sqlstate(&err).as_deref(), Some("KM004"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn updates_and_deletes_by_a_protected_value_touch_only_the_tenants_rows() {
    let setup = EncryptedSetup::start(SCHEMA, "public.patients", COLUMNS).await;
    let app = setup.app().await;
    load(&setup, &app).await;

    app.batch_execute("SET cmk.tenant_id = 'acme'")
        .await
        .unwrap();
    let changed = app
        .execute(
            "UPDATE patients SET notes = $1, ssn = $2 WHERE ssn = $3",
            &[&"moved", &"444-44-4444", &"111-11-1111"],
        )
        .await
        .unwrap();
    assert_eq!(changed, 1, "acme's row only, not globex's equal value");
    let found = rows(
        &app,
        "SELECT id, notes FROM patients WHERE ssn = '444-44-4444'",
    )
    .await;
    assert_eq!(found, vec![vec![Some("1".into()), Some("moved".into())]]);
    let deleted = app
        .execute("DELETE FROM patients WHERE mrn IN (10, 20)", &[])
        .await
        .unwrap();
    assert_eq!(deleted, 3, "acme's rows 1, 2 and 4");
    let remaining = count(&setup.direct, "SELECT count(*) FROM patients").await;
    assert_eq!(remaining, 4, "globex's row with mrn 10 is still there");
    assert_eq!(count(&setup.direct, PLAINTEXT_AT_REST).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn what_cannot_be_answered_exactly_is_refused_and_the_index_is_used() {
    let setup = EncryptedSetup::start(SCHEMA, "public.patients", COLUMNS).await;
    let app = setup.app().await;
    load(&setup, &app).await;
    app.batch_execute("SET cmk.tenant_id = 'acme'")
        .await
        .unwrap();
    for sql in [
        "SELECT id FROM patients WHERE ssn > '1'",
        "SELECT id FROM patients WHERE ssn LIKE '1%'",
        "SELECT id FROM patients WHERE lower(ssn) = 'ab'",
        "SELECT id FROM patients ORDER BY ssn",
        "SELECT id FROM patients WHERE notes = 'a1'",
        "SELECT a.id FROM patients a JOIN patients b ON a.ssn = b.ssn",
    ] {
        let err = app.simple_query(sql).await.expect_err(sql);
        assert_eq!(
            common::sqlstate(&err).as_deref(),
            Some("KM003"),
            "{sql}: {err}"
        );
        let err = app.query(sql, &[]).await.expect_err(sql);
        assert_eq!(
            common::sqlstate(&err).as_deref(),
            Some("KM003"),
            "{sql}: {err}"
        );
    }

    // The rewritten lookup uses the (tenant, blind index) index.
    app.batch_execute("SET enable_seqscan = off").await.unwrap();
    let plan: Vec<String> = app
        .query(
            "EXPLAIN SELECT id, ssn FROM patients WHERE ssn = $1",
            &[&"ab"],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("patients_ssn_lookup"), "{plan}");
    let plan = rows(&app, "EXPLAIN SELECT id FROM patients WHERE ssn = 'ab'").await;
    assert!(
        format!("{plan:?}").contains("patients_ssn_lookup"),
        "{plan:?}"
    );

    // A revoked tenant's lookups are KM001.
    keyring(&setup.ring(), "disable", "acme");
    let err = poll_until(true, || {
        app.query("SELECT id FROM patients WHERE ssn = $1", &[&"ab"])
    })
    .await
    .expect("refused");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("KM001"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_unique_index_on_tenant_and_blind_index_enforces_per_tenant_uniqueness() {
    let setup = EncryptedSetup::start(SCHEMA, "public.patients", COLUMNS).await;
    setup
        .direct
        .batch_execute("CREATE UNIQUE INDEX patients_ssn_unique ON patients (tenant_id, ssn_bidx)")
        .await
        .unwrap();
    let app = setup.app().await;
    app.batch_execute(
        "INSERT INTO patients (id, tenant_id, ssn) VALUES (1, 'acme', '111-11-1111'), \
         (2, 'globex', '111-11-1111')",
    )
    .await
    .expect("the same value in two tenants");
    for insert in [
        "INSERT INTO patients (id, tenant_id, ssn) VALUES (3, 'acme', '111-11-1111')",
        "INSERT INTO patients (id, tenant_id, ssn) VALUES (3, 'acme', E'111-11-1111')",
    ] {
        let err = app.batch_execute(insert).await.unwrap_err();
        assert_eq!(common::sqlstate(&err).as_deref(), Some("23505"), "{err}");
    }
    let err = app
        .execute(
            "INSERT INTO patients (id, tenant_id, ssn) VALUES ($1, $2, $3)",
            &[&3i32, &"acme", &"111-11-1111"],
        )
        .await
        .unwrap_err();
    assert_eq!(common::sqlstate(&err).as_deref(), Some("23505"), "{err}");
    assert_eq!(
        count(&setup.direct, "SELECT count(*) FROM patients").await,
        2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_config_live_prints_the_lookup_index_of_every_searchable_column() {
    let setup = EncryptedSetup::start(SCHEMA, "public.patients", COLUMNS).await;
    let check = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
            .args(["check-config", "--live"])
            .arg(setup.proxy.config_path())
            .output()
            .expect("run check-config");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = check();
    assert!(
        out.contains("public.patients.ssn: index patients_ssn_lookup"),
        "{out}"
    );
    let ddl = "CREATE INDEX CONCURRENTLY IF NOT EXISTS patients_mrn_bidx_lookup ON public.patients (tenant_id, mrn_bidx);";
    assert!(out.contains("public.patients.mrn: no index"), "{out}");
    assert!(out.contains(ddl), "{out}");
    assert!(
        out.contains("-- CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS patients_mrn_bidx_unique"),
        "{out}"
    );
    // The printed DDL runs as printed.
    setup.direct.batch_execute(ddl).await.unwrap();
    let out = check();
    assert!(
        out.contains("public.patients.mrn: index patients_mrn_bidx_lookup"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn lookups_wait_until_the_database_proves_every_value_has_its_blind_index() {
    let without_checks = SCHEMA
        .replacen(
            "CONSTRAINT cmk_bidx_ssn CHECK ((ssn IS NULL) = (ssn_bidx IS NULL)), ",
            "",
            1,
        )
        .replacen(
            ", CONSTRAINT cmk_bidx_mrn CHECK ((mrn IS NULL) = (mrn_bidx IS NULL))",
            "",
            1,
        );
    assert!(!without_checks.contains("cmk_bidx"), "{without_checks}");
    let setup = EncryptedSetup::start(&without_checks, "public.patients", COLUMNS).await;
    let app = setup.app().await;
    load(&setup, &app).await;
    let lookup = "SELECT id FROM patients WHERE tenant_id = 'acme' AND ssn = 'ab'";
    let err = app.simple_query(lookup).await.unwrap_err();
    assert_eq!(common::sqlstate(&err).as_deref(), Some("KM003"), "{err}");
    assert!(
        common::error_message(&err).contains("cmk_bidx_ssn"),
        "{err}"
    );
    // migrate adds and validates the constraints; the proxy sees them.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
        .args(["migrate", "--config"])
        .arg(setup.proxy.config_path())
        .output()
        .expect("run migrate");
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("cmk_bidx_ssn validated"), "{said}");
    poll_until(false, || app.simple_query(lookup)).await;
    assert_eq!(rows(&app, lookup).await, vec![vec![Some("7".to_owned())]]);
}
