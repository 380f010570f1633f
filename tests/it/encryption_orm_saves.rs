//! ORM entity saves (issue 16, point 3): Django's `Model.save()` and JPA's
//! entity update set every column, the tenant column included, to the
//! value it has; upserts set it from EXCLUDED. The proxy accepts them by
//! pinning the statement to the tenant they name, so a row of another
//! tenant is never touched, and still refuses a real move.

use crate::common;

use common::encryption::{count, rows, EncryptedSetup};

const SCHEMA: &str = "CREATE TABLE patients (id int PRIMARY KEY, tenant_id text NOT NULL, \
    ssn bytea, ssn_bidx bytea, notes bytea, cmk_edek jsonb)";

const COLUMNS: &[&str] = &["ssn: {type: text, search: equality}", "notes: {type: text}"];

const PLAINTEXT_AT_REST: &str = "SELECT count(*) FROM patients WHERE \
    (ssn IS NOT NULL AND substr(ssn, 1, 4) <> '\\x434d4b01'::bytea) OR \
    (notes IS NOT NULL AND substr(notes, 1, 4) <> '\\x434d4b01'::bytea)";

const SAVE: &str = "UPDATE \"patients\" SET \"tenant_id\" = $1, \"ssn\" = $2, \"notes\" = $3 \
    WHERE \"patients\".\"id\" = $4";

/// Rails `upsert_all`, Django `bulk_create(update_conflicts=True)`.
const UPSERT: &str = "INSERT INTO patients (id, tenant_id, ssn, notes) VALUES ($1, $2, $3, $4) \
    ON CONFLICT (id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id, ssn = EXCLUDED.ssn, \
    notes = EXCLUDED.notes";

/// The (tenant, ssn, notes) of row `id`, read through the proxy.
async fn row(app: &tokio_postgres::Client, id: i32) -> Vec<Option<String>> {
    let sql = format!("SELECT tenant_id, ssn, notes FROM patients WHERE id = {id}");
    rows(app, &sql).await.into_iter().next().unwrap_or_default()
}

fn texts(values: [&str; 3]) -> Vec<Option<String>> {
    values.iter().map(|v| Some((*v).to_owned())).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_entity_save_that_sets_the_tenant_column_updates_only_that_tenants_row() {
    let setup = EncryptedSetup::start(SCHEMA, "public.patients", COLUMNS).await;
    let app = setup.app().await;
    app.batch_execute(
        "INSERT INTO patients (id, tenant_id, ssn, notes) VALUES \
         (1, 'acme', '111-11-1111', 'a'), (2, 'globex', '222-22-2222', 'g')",
    )
    .await
    .unwrap();

    // Extended protocol, no session tenant: the save of acme's row.
    let saved = app
        .execute(SAVE, &[&"acme", &"111-00-0000", &"a2", &1i32])
        .await
        .unwrap();
    assert_eq!(saved, 1);
    assert_eq!(row(&app, 1).await, texts(["acme", "111-00-0000", "a2"]));
    // The same statement naming acme for globex's row touches nothing.
    let saved = app
        .execute(SAVE, &[&"acme", &"stolen", &"stolen", &2i32])
        .await
        .unwrap();
    assert_eq!(saved, 0);
    assert_eq!(row(&app, 2).await, texts(["globex", "222-22-2222", "g"]));

    // Simple protocol, literals, with the session tenant set.
    app.batch_execute("SET cmk.tenant_id = 'globex'")
        .await
        .unwrap();
    app.batch_execute(
        "UPDATE \"patients\" SET \"tenant_id\" = 'globex', \"ssn\" = '222-00-0000', \
         \"notes\" = 'g2' WHERE \"patients\".\"id\" = 2",
    )
    .await
    .unwrap();
    assert_eq!(row(&app, 2).await, texts(["globex", "222-00-0000", "g2"]));
    // Another tenant than the session's is refused (KM004), in both protocols.
    let err = app
        .batch_execute("UPDATE patients SET tenant_id = 'acme', ssn = 'x' WHERE id = 1")
        .await
        .unwrap_err();
    assert_eq!(common::sqlstate(&err).as_deref(), Some("KM004"), "{err}");
    let err = app
        .execute(SAVE, &[&"acme", &"x", &"x", &1i32])
        .await
        .unwrap_err();
    assert_eq!(common::sqlstate(&err).as_deref(), Some("KM004"), "{err}");
    app.batch_execute("RESET cmk.tenant_id").await.unwrap();

    // A real move never happens: refused where both tenants are known when
    // it is planned (KM003), else pinned to both and so matching no row.
    let err = app
        .execute(
            "UPDATE patients SET tenant_id = 'globex' WHERE id = 1 AND tenant_id = 'acme'",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(common::sqlstate(&err).as_deref(), Some("KM003"), "{err}");
    let moved = app
        .execute(
            "UPDATE patients SET tenant_id = $1 WHERE id = 1 AND tenant_id = $2",
            &[&"globex", &"acme"],
        )
        .await
        .unwrap();
    assert_eq!(moved, 0);
    // Simple-protocol literals are planned by their shape (as parameters).
    if let Err(err) = app
        .batch_execute(
            "UPDATE patients SET tenant_id = 'globex' WHERE id = 1 AND tenant_id = 'acme'",
        )
        .await
    {
        assert_eq!(common::sqlstate(&err).as_deref(), Some("KM003"), "{err}");
    }
    assert_eq!(row(&app, 1).await, texts(["acme", "111-00-0000", "a2"]));

    // The upsert form: the conflicting row is globex's, the proposed one
    // acme's: nothing of acme's lands in globex's row.
    app.execute(UPSERT, &[&2i32, &"acme", &"stolen", &"stolen"])
        .await
        .unwrap();
    assert_eq!(row(&app, 2).await, texts(["globex", "222-00-0000", "g2"]));
    // Its own row is updated.
    app.execute(UPSERT, &[&1i32, &"acme", &"111-99-9999", &"a3"])
        .await
        .unwrap();
    assert_eq!(row(&app, 1).await, texts(["acme", "111-99-9999", "a3"]));

    assert_eq!(count(&setup.direct, PLAINTEXT_AT_REST).await, 0);
    assert_eq!(
        count(&setup.direct, "SELECT count(*) FROM patients").await,
        2
    );
}

/// Django's `bulk_create` (and bulk loaders binding arrays) insert with
/// `SELECT * FROM UNNEST(arrays…)`: each protected array is sealed element
/// by element under its row's tenant, with binary array parameters too.
#[tokio::test(flavor = "multi_thread")]
async fn an_unnest_insert_seals_every_element_under_its_rows_tenant() {
    let setup = EncryptedSetup::start(SCHEMA, "public.patients", COLUMNS).await;
    let app = setup.app().await;
    let insert = "INSERT INTO patients (id, tenant_id, ssn, notes) \
        SELECT * FROM UNNEST($1::int[], $2::text[], $3::text[], $4::text[])";
    let ids = vec![1i32, 2, 3];
    let tenants = vec!["acme", "globex", "acme"];
    let ssns = vec![Some("111-11-1111"), Some("222-22-2222"), None];
    let notes = vec![Some("a \"quoted\", {braced} note"), None];
    let n = app
        .execute(insert, &[&ids, &tenants, &ssns, &notes])
        .await
        .unwrap();
    assert_eq!(n, 3);
    assert_eq!(
        rows(
            &app,
            "SELECT id, tenant_id, ssn, notes FROM patients ORDER BY id"
        )
        .await,
        vec![
            vec![
                Some("1".into()),
                Some("acme".into()),
                Some("111-11-1111".into()),
                Some("a \"quoted\", {braced} note".into())
            ],
            vec![
                Some("2".into()),
                Some("globex".into()),
                Some("222-22-2222".into()),
                None
            ],
            vec![Some("3".into()), Some("acme".into()), None, None],
        ]
    );
    assert_eq!(count(&setup.direct, PLAINTEXT_AT_REST).await, 0);
    // Each row is sealed under its own tenant: its EDEK is that tenant's.
    assert_eq!(
        count(
            &setup.direct,
            "SELECT count(DISTINCT cmk_edek::text) FROM patients WHERE ssn IS NOT NULL"
        )
        .await,
        2
    );
    // Simple protocol, array literals (Django with client-side binding).
    app.batch_execute(
        "INSERT INTO patients (id, tenant_id, ssn, notes) SELECT * FROM UNNEST(('{4,5}')::int[], \
         ('{acme,globex}')::varchar[], ('{444-44-4444,555-55-5555}')::varchar[], ('{x,NULL}')::text[])",
    )
    .await
    .unwrap();
    assert_eq!(
        count(&setup.direct, "SELECT count(*) FROM patients").await,
        5
    );
    assert_eq!(count(&setup.direct, PLAINTEXT_AT_REST).await, 0);
    // A row without a tenant, or of another tenant than the session's, is
    // KM004 and nothing of the statement is stored.
    let err = app
        .execute(
            insert,
            &[
                &vec![6i32, 7],
                &vec![Some("acme"), None],
                &vec!["6", "7"],
                &vec!["n", "n"],
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(common::sqlstate(&err).as_deref(), Some("KM004"), "{err}");
    app.batch_execute("SET cmk.tenant_id = 'acme'")
        .await
        .unwrap();
    let err = app
        .execute(
            insert,
            &[
                &vec![6i32, 7],
                &vec!["acme", "globex"],
                &vec!["6", "7"],
                &vec!["n", "n"],
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(common::sqlstate(&err).as_deref(), Some("KM004"), "{err}");
    assert_eq!(
        count(&setup.direct, "SELECT count(*) FROM patients").await,
        5
    );
}
