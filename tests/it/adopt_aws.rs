//! `cmk-proxy encrypt` with a tenant whose master key is in AWS KMS (a real
//! moto server): the tenant's rows are sealed under a DEK wrapped by its
//! AWS key, read back through the proxy; a disabled AWS key skips the
//! tenant's rows (KM001, listed) and leaves them as they were.

use crate::common::encryption::{rows, EncryptedSetup};
use crate::support::moto;

use cmk_proxy::kms::AwsKmsProvider;

const LEGACY: &str = "CREATE TABLE patients (
    id int PRIMARY KEY,
    tenant_id text NOT NULL,
    ssn text,
    birth_date date,
    notes text);
INSERT INTO patients
SELECT i, (ARRAY['acme', 'globex'])[1 + i % 2], 'ssn-' || i, DATE '1970-01-01' + i, 'note ' || i
FROM generate_series(1, 200) AS i;";

fn encrypt(setup: &EncryptedSetup) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
        .args(["encrypt", "--table", "public.patients", "--config"])
        .arg(setup.proxy.config_path())
        .output()
        .expect("run encrypt");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypt_seals_an_aws_kms_tenant_and_skips_it_while_its_key_is_disabled() {
    let moto = moto::Moto::start();
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    let admin = AwsKmsProvider::with_static_credentials(
        Some("us-east-1"),
        Some(&moto.endpoint()),
        "test",
        "test",
    )
    .await
    .expect("aws client");
    let key_id = admin
        .client()
        .create_key()
        .send()
        .await
        .expect("create key")
        .key_metadata()
        .expect("metadata")
        .key_id()
        .to_owned();
    let setup = EncryptedSetup::start_configured(
        LEGACY,
        "public.patients",
        &[
            "ssn: {type: text}",
            "birth_date: {type: date}",
            "notes: {type: text}",
        ],
        &format!(
            "aws: {{kind: aws-kms, region: us-east-1, endpoint: \"{}\"}}",
            moto.endpoint()
        ),
        &format!("acme: {{provider: aws, key: \"{key_id}\"}}"),
        "server:\n  catalog_refresh: 1s\n",
    )
    .await;
    let before = rows(&setup.direct, "SELECT * FROM patients ORDER BY id").await;

    // The AWS key is disabled: acme's rows are skipped, globex's sealed.
    admin
        .client()
        .disable_key()
        .key_id(&key_id)
        .send()
        .await
        .expect("disable in moto");
    let (code, out) = encrypt(&setup);
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains("tenant acme: tenant's key is revoked (KM001)"),
        "{out}"
    );
    assert!(
        out.contains("left with legacy values: 100 rows of tenant acme"),
        "{out}"
    );
    let acme_legacy = rows(
        &setup.direct,
        "SELECT count(*) FROM patients__cmk_base WHERE tenant_id = 'acme' \
         AND ssn IS NOT NULL AND ssn__cmk IS NULL",
    )
    .await;
    assert_eq!(acme_legacy, vec![vec![Some("100".to_owned())]]);

    // Enabled again: the next run finishes.
    admin
        .client()
        .enable_key()
        .key_id(&key_id)
        .send()
        .await
        .expect("enable in moto");
    let (code, out) = encrypt(&setup);
    assert_eq!(code, Some(0), "{out}");
    let wrapped_by = rows(
        &setup.direct,
        "SELECT DISTINCT provider FROM cmk.data_keys WHERE tenant_id = 'acme'",
    )
    .await;
    assert_eq!(wrapped_by, vec![vec![Some("aws".to_owned())]]);
    let sealed = rows(
        &setup.direct,
        "SELECT count(*) FROM patients WHERE substr(ssn, 1, 4) = '\\x434d4b01'::bytea",
    )
    .await;
    assert_eq!(sealed, vec![vec![Some("200".to_owned())]]);

    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let app = setup.app().await;
    let after = rows(
        &app,
        "SELECT id, tenant_id, ssn, birth_date, notes FROM patients ORDER BY id",
    )
    .await;
    assert_eq!(after, before);
}
