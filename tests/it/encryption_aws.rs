//! Revocation end to end with the AWS KMS provider: a real moto server
//! holds tenant acme's master key; disabling it there makes acme's reads and
//! writes through the proxy fail with KM001 within approval_ttl + one KMS
//! call, while globex (local keyring) keeps working on the same connection;
//! enabling it restores access.

use crate::common;
use crate::support::moto;

use std::time::Duration;

use cmk_proxy::kms::AwsKmsProvider;
use common::encryption::{poll_until, EncryptedSetup};

const ACME_READ: &str = "SELECT secret FROM vault WHERE tenant_id = 'acme'";

const SCHEMA: &str = "CREATE TABLE vault (id serial PRIMARY KEY, tenant_id text NOT NULL, \
    secret bytea, cmk_edek jsonb)";

#[tokio::test(flavor = "multi_thread")]
async fn aws_kms_key_disabled_in_moto_revokes_the_tenant_through_the_proxy() {
    let moto = moto::Moto::start();
    // The proxy takes AWS credentials from its environment, as in production.
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
    let s = EncryptedSetup::start_with(
        SCHEMA,
        "public.vault",
        &["secret: {type: text}"],
        &format!(
            "aws: {{kind: aws-kms, region: us-east-1, endpoint: \"{}\"}}",
            moto.endpoint()
        ),
        &format!("acme: {{provider: aws, key: \"{key_id}\"}}"),
    )
    .await;
    let app = s.app().await;
    let insert = "INSERT INTO vault (tenant_id, secret) VALUES ($1, $2)";
    app.execute(insert, &[&"acme", &"aws-held"])
        .await
        .expect("acme write");
    app.execute(insert, &[&"globex", &"local-held"])
        .await
        .expect("globex write");
    assert!(poll_until(false, || app.query(ACME_READ, &[]))
        .await
        .is_none());

    admin
        .client()
        .disable_key()
        .key_id(&key_id)
        .send()
        .await
        .expect("disable in moto");
    let err = poll_until(true, || app.query(ACME_READ, &[]))
        .await
        .expect("revoked");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("KM001"), "{err}");
    assert!(common::error_message(&err).contains("acme"), "{err}");
    let err = app
        .execute(insert, &[&"acme", &"refused"])
        .await
        .expect_err("write refused");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("KM001"), "{err}");
    let globex: String = app
        .query_one("SELECT secret FROM vault WHERE tenant_id = 'globex'", &[])
        .await
        .expect("globex keeps working")
        .get(0);
    assert_eq!(globex, "local-held");

    admin
        .client()
        .enable_key()
        .key_id(&key_id)
        .send()
        .await
        .expect("enable in moto");
    assert!(
        poll_until(false, || app.query(ACME_READ, &[]))
            .await
            .is_none(),
        "re-enabled"
    );
    app.execute(insert, &[&"acme", &"again"])
        .await
        .expect("acme writes again");
    // The audit trail shows the KMS calls and the denial, no values.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let audit = s.audit();
    assert!(audit.contains("kms_call"), "{audit}");
    assert!(!audit.contains("aws-held"));
}
