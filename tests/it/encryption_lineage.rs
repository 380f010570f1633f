//! Issue 14, defects 4 and 5: a protected value may reach the client only
//! as the bare column, opened in a row of its own tenant. Aliases (CTE,
//! subquery, column-alias lists), joins on it, conditions, grouping and
//! ordering on it, and views that compute on it are refused (KM003) in
//! both protocols, and no envelope bytes (raw, hex or base64) reach the
//! client; a cell copied into another tenant's row is refused (KM005 or
//! KM006) whether or not the query selects the tenant column.

use crate::common;
use crate::encryption_attacks::{carries_an_envelope, extended, simple, COLUMNS, SCHEMA};

use common::encryption::{count, rows, EncryptedSetup};
use tokio_postgres::Client;

/// Reads that launder a protected column through an alias, compare,
/// group or order on it, or join on it: each must be refused with KM003.
const LAUNDERED: &[&str] = &[
    // CTE aliases.
    "WITH c AS (SELECT id, ssn AS x FROM patients) SELECT id, x::text FROM c",
    "WITH c AS (SELECT id, ssn AS x FROM patients) SELECT id, encode(x, 'hex') FROM c",
    "WITH c AS (SELECT id, ssn AS x FROM patients) SELECT id, substr(x, 5) FROM c",
    "WITH c AS (SELECT id, ssn AS x FROM patients) SELECT id, ARRAY[x] FROM c",
    "WITH c AS (SELECT id, ssn AS x FROM patients) SELECT id, x::text, encode(x, 'hex'), \
     substr(x, 5), ARRAY[x] FROM c",
    "WITH c (i, x) AS (SELECT id, notes FROM patients) SELECT encode(x, 'base64') FROM c",
    "WITH c AS (SELECT * FROM patients) SELECT encode(ssn, 'hex') FROM c",
    "WITH c AS (SELECT id, ssn AS x FROM patients), d AS (SELECT x AS y FROM c) \
     SELECT encode(y, 'escape') FROM d",
    // Subquery aliases.
    "SELECT encode(x, 'hex') FROM (SELECT ssn AS x FROM patients) s",
    "SELECT encode(s.x, 'hex') FROM (SELECT ssn FROM patients) s(x)",
    "SELECT (SELECT encode(x, 'hex') FROM (SELECT ssn AS x FROM patients LIMIT 1) s)",
    // Column-alias lists.
    "SELECT encode(c, 'hex') FROM patients AS p(i, t, c)",
    "SELECT encode(p.c, 'hex') FROM patients AS p(i, t, c)",
    // Joins on it.
    "SELECT p.id FROM patients p JOIN patients q USING (ssn)",
    "SELECT encode(ssn, 'hex') FROM patients p JOIN patients q USING (ssn)",
    "SELECT id FROM patients NATURAL JOIN (SELECT id, ssn FROM patients) s",
    "SELECT s.id FROM patients p JOIN (SELECT id, ssn AS x FROM patients) s ON s.x = p.ssn",
    // Conditions and grouping on aliases.
    "WITH c AS (SELECT id, ssn AS x FROM patients) SELECT id FROM c \
     WHERE substr(x, 1, 4) = '\\x434d4b01'::bytea",
    "WITH c AS (SELECT id, ssn AS x FROM patients) SELECT id FROM c WHERE x IS DISTINCT FROM NULL \
     AND x > '\\x00'::bytea",
    "WITH c AS (SELECT id, ssn AS x FROM patients) SELECT count(*) FROM c GROUP BY x",
    "WITH c AS (SELECT id, ssn AS x FROM patients) SELECT x FROM c GROUP BY x",
    "SELECT x FROM (SELECT ssn AS x FROM patients) s GROUP BY 1",
    // Ordering on it.
    "SELECT id, ssn FROM patients ORDER BY 2",
    "SELECT ssn AS x FROM patients ORDER BY x",
    "WITH c AS (SELECT id, ssn AS x FROM patients) SELECT id FROM c ORDER BY x",
];

/// Views that compute on protected columns, created through the proxy.
const COMPUTED_VIEWS: &[&str] = &[
    "CREATE VIEW v AS SELECT ssn::text AS s, encode(notes, 'base64') AS n FROM patients",
    "CREATE VIEW v AS SELECT encode(x, 'hex') AS h FROM (SELECT ssn AS x FROM patients) s",
    "CREATE VIEW v AS WITH c AS (SELECT ssn AS x FROM patients) SELECT x::text AS t FROM c",
];

async fn seeded() -> EncryptedSetup {
    let setup = EncryptedSetup::start(SCHEMA, "public.patients", COLUMNS).await;
    let seed = setup.app().await;
    rows(
        &seed,
        "INSERT INTO patients (tenant_id, ssn, notes) VALUES ('acme', '123-45-6789', 'n1'), \
         ('globex', '987-65-4321', 'n2')",
    )
    .await;
    setup
}

/// Runs `sql` in `protocol`; asserts that it was refused with one of
/// `codes` and that nothing received carries an envelope or `secrets`.
async fn assert_refused_in(
    app: &Client,
    protocol: &str,
    sql: &str,
    codes: &[&str],
    secrets: &[&str],
) {
    let outcome = match protocol {
        "simple" => simple(app, sql).await,
        _ => extended(app, sql).await,
    };
    let context = format!("{protocol}: {sql}");
    match outcome {
        Ok(values) => {
            for value in &values {
                assert!(!carries_an_envelope(value), "{context}: received {value}");
                for secret in secrets {
                    assert!(!value.contains(secret), "{context}: received {value}");
                }
            }
            panic!("{context}: served {values:?}, expected one of {codes:?}");
        }
        Err(e) => {
            let code = common::sqlstate(&e).unwrap_or_default();
            assert!(codes.contains(&code.as_str()), "{context}: {e:?}");
        }
    }
}

#[tokio::test]
async fn values_derived_from_protected_columns_are_refused_through_any_alias() {
    let setup = seeded().await;
    for sql in LAUNDERED {
        for protocol in ["simple", "extended"] {
            let app = setup.app().await;
            assert_refused_in(&app, protocol, sql, &["KM003"], &[]).await;
        }
    }
}

#[tokio::test]
async fn protected_columns_are_served_only_where_their_rows_tenant_is_known() {
    let setup = seeded().await;
    let app = setup.app().await;
    rows(
        &app,
        "CREATE VIEW with_tenant AS SELECT id, tenant_id AS t, ssn AS s FROM patients; \
         CREATE VIEW without_tenant AS SELECT id, ssn FROM patients",
    )
    .await;
    // From its table, or a view that shows the tenant column: decrypted,
    // each cell checked against its row's tenant (hidden from the client).
    for sql in [
        "SELECT id, ssn FROM patients ORDER BY id",
        "SELECT p.id, p.ssn FROM public.patients AS p ORDER BY 1",
        "SELECT * FROM patients ORDER BY id",
        "SELECT id, s FROM with_tenant ORDER BY id",
        "WITH c AS (SELECT id FROM patients) SELECT c.id, p.ssn FROM c JOIN patients p USING (id) \
         ORDER BY 1",
    ] {
        let read = rows(&app, sql).await;
        let ssn = read[0].iter().flatten().any(|v| v == "123-45-6789");
        assert!(ssn, "simple: {sql}: {read:?}");
        let star = sql.contains('*');
        // The row's tenant is not shown unless the client selected it.
        let shown = read[0].iter().flatten().any(|v| v == "acme");
        assert_eq!(shown, star, "{sql}: {read:?}");
        let read = app.query(sql, &[]).await.unwrap();
        let width = read[0].len();
        let values: Vec<String> = (0..width)
            .filter_map(|i| read[0].try_get::<_, String>(i).ok())
            .collect();
        assert!(values.iter().any(|v| v == "123-45-6789"), "extended: {sql}");
        // EDEK and blind index hidden too.
        assert_eq!(width, if star { 6 - 2 } else { 2 }, "extended: {sql}");
    }
    // Through a CTE, a subquery or a view without the tenant column the
    // row's tenant cannot be checked: refused.
    for sql in [
        "WITH c AS (SELECT id, ssn AS x FROM patients) SELECT id, x FROM c ORDER BY id",
        "WITH c (i, x) AS (SELECT id, ssn FROM patients) SELECT i, x FROM c ORDER BY i",
        "SELECT x FROM (SELECT ssn AS x FROM patients) s",
        "SELECT ssn FROM without_tenant",
        "SELECT ssn FROM patients UNION ALL SELECT notes FROM patients",
        "SELECT a.ssn, b.ssn FROM patients a JOIN patients b ON a.id = b.id",
    ] {
        for protocol in ["simple", "extended"] {
            assert_refused_in(&app, protocol, sql, &["KM003"], &[]).await;
        }
    }
}

#[tokio::test]
async fn a_view_computing_on_protected_columns_is_refused_at_create_view() {
    let setup = seeded().await;
    for sql in COMPUTED_VIEWS {
        for protocol in ["simple", "extended"] {
            let app = setup.app().await;
            assert_refused_in(&app, protocol, sql, &["KM003"], &[]).await;
            assert_eq!(
                count(
                    &setup.direct,
                    "SELECT count(*) FROM pg_views WHERE viewname = 'v'"
                )
                .await,
                0,
                "{protocol}: {sql} created the view"
            );
        }
    }
    // A view of the bare columns stays allowed and is decrypted.
    let app = setup.app().await;
    rows(
        &app,
        "CREATE VIEW v AS SELECT id, tenant_id, ssn FROM patients",
    )
    .await;
    let read = rows(&app, "SELECT ssn FROM v ORDER BY id").await;
    assert_eq!(read[0][0].as_deref(), Some("123-45-6789"));
}

/// Copies acme's ssn cell into globex's row, directly in the database.
async fn move_acme_cell_into_globex_row(setup: &EncryptedSetup) {
    setup
        .direct
        .batch_execute(
            "UPDATE patients SET ssn = (SELECT ssn FROM patients WHERE tenant_id = 'acme') \
             WHERE tenant_id = 'globex'",
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_cell_moved_into_another_tenants_row_is_never_served() {
    let setup = seeded().await;
    move_acme_cell_into_globex_row(&setup).await;
    let reads = [
        "SELECT ssn FROM patients WHERE tenant_id = 'globex'",
        "SELECT id, ssn FROM patients ORDER BY id",
        "SELECT tenant_id, ssn FROM patients WHERE tenant_id = 'globex'",
        "SELECT * FROM patients WHERE tenant_id = 'globex'",
        "SELECT p.ssn FROM patients p WHERE p.tenant_id = 'globex'",
        "SELECT ssn AS s FROM patients WHERE tenant_id <> 'acme'",
        "UPDATE patients SET id = id WHERE tenant_id = 'globex' RETURNING ssn",
    ];
    for session_tenant in [None, Some("acme"), Some("globex")] {
        for sql in reads {
            for protocol in ["simple", "extended"] {
                let app = setup.app().await;
                if let Some(tenant) = session_tenant {
                    app.batch_execute(&format!("SET cmk.tenant_id = '{tenant}'"))
                        .await
                        .unwrap();
                }
                assert_refused_in(&app, protocol, sql, &["KM005", "KM006"], &["123-45-6789"]).await;
            }
        }
    }
    // acme's own row still reads.
    let app = setup.app().await;
    let read = rows(&app, "SELECT ssn FROM patients WHERE tenant_id = 'acme'").await;
    assert_eq!(read[0][0].as_deref(), Some("123-45-6789"));
}
