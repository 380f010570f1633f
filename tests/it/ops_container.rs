//! What can be checked of the container without a Docker engine: the demo
//! policy the compose file mounts runs against a real PostgreSQL with
//! docker/init.sql and a real moto holding the tenants' keys under the
//! aliases kms-init creates; the HEALTHCHECK command answers from the
//! admin endpoint; the compose file parses and names files that exist.

use std::path::Path;

use cmk_proxy::kms::AwsKmsProvider;

use crate::common::encryption::rows;
use crate::common::{connect, free_port, pg, run_cmk_proxy_code, Proxy};
use crate::ops_admin::admin;
use crate::support::moto;

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

#[tokio::test(flavor = "multi_thread")]
async fn compose_demo_policy_serves_with_moto_keys_under_tenant_aliases() {
    let moto = moto::Moto::start();
    // The proxy takes AWS credentials from its environment, as in compose.
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    let kms = AwsKmsProvider::with_static_credentials(
        Some("us-east-1"),
        Some(&moto.endpoint()),
        "test",
        "test",
    )
    .await
    .expect("aws client");
    // What the kms-init service does.
    for tenant in ["acme", "globex"] {
        let created = kms.client().create_key().send().await.expect("create key");
        let id = created
            .key_metadata()
            .expect("metadata")
            .key_id()
            .to_owned();
        kms.client()
            .create_alias()
            .alias_name(format!("alias/{tenant}"))
            .target_key_id(id)
            .send()
            .await
            .expect("create alias");
    }
    let pg = pg();
    pg.psql("app", &repo_file("docker/init.sql"))
        .expect("docker/init.sql");

    let (port, admin_port) = (free_port(), free_port());
    let policy = repo_file("docker/policy.yaml")
        .replace("listen: 0.0.0.0:6432", &format!("listen: 127.0.0.1:{port}"))
        .replace(
            "listen: 0.0.0.0:9187",
            &format!("listen: 127.0.0.1:{admin_port}"),
        )
        .replace(
            "postgres://postgres:postgres@postgres:5432/app",
            &pg.admin_url("app"),
        )
        .replace("http://kms:5000", &moto.endpoint());
    let proxy = Proxy::start_listening_on(port, &policy, &[]);

    let (app, _conn) = connect(&proxy.url("postgres", "", "app")).await;
    app.batch_execute(
        "INSERT INTO patients (tenant_id, ssn, birth_date, notes) VALUES \
         ('acme', '123-45-6789', '1980-01-02', 'allergic to penicillin'), \
         ('globex', '987-65-4321', '1975-06-07', 'none')",
    )
    .await
    .expect("demo insert");
    assert_eq!(
        rows(
            &app,
            "SELECT tenant_id, ssn, birth_date, notes FROM patients ORDER BY id"
        )
        .await,
        vec![
            vec![
                Some("acme".to_owned()),
                Some("123-45-6789".to_owned()),
                Some("1980-01-02".to_owned()),
                Some("allergic to penicillin".to_owned())
            ],
            vec![
                Some("globex".to_owned()),
                Some("987-65-4321".to_owned()),
                Some("1975-06-07".to_owned()),
                Some("none".to_owned())
            ],
        ]
    );
    let (direct, _direct_conn) = connect(&pg.admin_url("app")).await;
    let sealed: i64 = direct
        .query_one(
            "SELECT count(*) FROM patients WHERE substr(ssn, 1, 4) = '\\x434d4b01'::bytea",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sealed, 2, "PostgreSQL holds ciphertext");

    let (status, body) = admin(admin_port, "GET", "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"aws\":\"ok\""), "{body}");
    // The image's HEALTHCHECK command.
    let admin_addr = format!("127.0.0.1:{admin_port}");
    let (code, out) = run_cmk_proxy_code(["health", "--admin", admin_addr.as_str()]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("200"), "{out}");
    let (code, out) = run_cmk_proxy_code(["health", "--admin", "127.0.0.1:1", "--timeout", "1s"]);
    assert_eq!(code, Some(1), "{out}");
}

#[test]
fn compose_file_runs_the_image_with_the_demo_policy() {
    let compose: serde_json::Value =
        serde_saphyr::from_str(&repo_file("docker-compose.yml")).expect("compose YAML");
    let proxy = &compose["services"]["cmk-proxy"];
    assert_eq!(proxy["build"], ".", "the image of ./Dockerfile");
    assert!(
        proxy.get("command").is_none(),
        "no build inside a Rust image"
    );
    assert!(proxy["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p == "6432:6432"));
    for service in ["postgres", "kms", "kms-init"] {
        assert!(compose["services"].get(service).is_some(), "{service}");
    }
    for volume in proxy["volumes"].as_array().into_iter().flatten().chain(
        compose["services"]["postgres"]["volumes"]
            .as_array()
            .into_iter()
            .flatten(),
    ) {
        let source = volume.as_str().unwrap().split(':').next().unwrap();
        assert!(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(source).is_file(),
            "{source} is mounted but missing"
        );
    }
    let dockerfile = repo_file("Dockerfile");
    assert!(dockerfile.contains("USER 65532"), "non-root runtime");
    assert!(
        dockerfile.contains("HEALTHCHECK") && dockerfile.contains("\"health\""),
        "HEALTHCHECK asks /readyz through cmk-proxy health"
    );
    assert!(
        repo_file("docker/policy.yaml").contains("0.0.0.0:9187"),
        "the policy serves the admin port the HEALTHCHECK asks"
    );
}
