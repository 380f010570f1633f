//! Fuzzing of every input a client, the server or an operator controls
//! (issue 17), as proptest cases: the frame header, frontend and backend
//! message decoders, the startup packet, the SQL planner and literal
//! scanner, every declared type's text and binary input, the cell envelope,
//! the keyring file and the policy loader. None may panic; each case is
//! bounded. CI runs proptest's default number of cases per target (256);
//! `PROPTEST_CASES=N` runs longer (see the issue note for a long run).

use cmk_proxy::config::{parse_policy, DeclaredType, Policy};
use cmk_proxy::crypto::{self, CellAad, Dek};
use cmk_proxy::kms::Keyring;
use cmk_proxy::protocol::messages::{
    decode_data_row, decode_parameter_description, decode_row_description, Bind, Parse,
};
use cmk_proxy::protocol::{FrameHeader, StartupPacket};
use cmk_proxy::{rewrite, values};
use proptest::prelude::*;

use crate::common;

const TYPES: [DeclaredType; 14] = [
    DeclaredType::Text,
    DeclaredType::Varchar,
    DeclaredType::Int2,
    DeclaredType::Int4,
    DeclaredType::Int8,
    DeclaredType::Numeric,
    DeclaredType::Float8,
    DeclaredType::Bool,
    DeclaredType::Date,
    DeclaredType::Timestamp,
    DeclaredType::Timestamptz,
    DeclaredType::Uuid,
    DeclaredType::Jsonb,
    DeclaredType::Bytea,
];

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

/// Text made of the characters values of the declared types are written
/// with, so cases reach past the first check more often than random bytes.
fn value_text() -> impl Strategy<Value = String> {
    proptest::string::string_regex(r#"[-+0-9eE.:TZ ,\[\]{}"\\u\x00-\x1fa-fnrtx/infityNaBC]{0,64}"#)
        .expect("regex")
}

fn sql_text() -> impl Strategy<Value = String> {
    proptest::string::string_regex(
        r#"(SELECT|INSERT INTO|UPDATE|SET|VALUES|WHERE|patients|ssn|\$1|'|"|\$\$|--|/\*|\*/|E'|U&|\\|;|\(|\)|,|=| |[a-z0-9]){0,40}"#,
    )
    .expect("regex")
}

fn policy() -> Policy {
    parse_policy(
        "tables:\n  public.patients:\n    tenant_column: tenant_id\n    columns:\n      ssn: {type: text}\n      notes: {type: jsonb}\n",
        "fuzz",
    )
    .expect("policy")
}

proptest! {
    #[test]
    fn frame_header_never_panics(buf in bytes(16), limit in 0usize..1 << 20) {
        let _ = FrameHeader::peek(&buf, limit);
    }

    #[test]
    fn frontend_and_backend_decoders_never_panic(body in bytes(256)) {
        let _ = Parse::decode(&body);
        let _ = Bind::decode(&body);
        let _ = decode_parameter_description(&body);
        let _ = decode_row_description(&body);
        let _ = decode_data_row(&body);
    }

    #[test]
    fn startup_packets_never_panic(body in bytes(128), version in any::<u32>()) {
        let mut packet = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        packet.extend_from_slice(&version.to_be_bytes());
        packet.extend_from_slice(&body);
        let _ = StartupPacket::parse(&packet);
        let _ = StartupPacket::parse(&body);
    }

    #[test]
    fn sql_planner_and_literal_scanner_never_panic(sql in sql_text()) {
        let _ = rewrite::analyze(&policy(), &sql, 1);
        let _ = rewrite::parameterize(&sql);
        let _ = rewrite::fingerprint(&sql);
    }

    #[test]
    fn every_declared_type_input_never_panics(
        ty in proptest::sample::select(&TYPES[..]),
        text in value_text(),
        raw in bytes(64),
    ) {
        let _ = values::canonical_text(ty, text.as_bytes());
        let _ = values::canonical_text(ty, &raw);
        let _ = values::from_binary(ty, &raw);
        // What is accepted converts both ways and keeps its canonical text.
        if let Ok(canonical) = values::canonical_text(ty, text.as_bytes()) {
            let binary = values::to_binary(ty, &canonical).expect("to binary");
            prop_assert_eq!(values::from_binary(ty, &binary).expect("from binary"), canonical);
        }
    }

    #[test]
    fn cell_envelope_never_panics_and_never_opens_forged_bytes(cell in bytes(128)) {
        let dek = Dek::generate();
        let aad = CellAad { tenant_id: "acme", table: "public.patients", column: "ssn" };
        let _ = crypto::peek_dek_id(&cell);
        prop_assert!(crypto::open(&dek, &aad, &cell).is_err());
    }

    #[test]
    fn keyring_file_never_panics(content in bytes(512)) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("keyring.json");
        std::fs::write(&path, &content).expect("write");
        let _ = Keyring::load(&path);
    }

    #[test]
    fn policy_loader_never_panics(
        text in proptest::string::string_regex(
            r#"(tables:|  public.t:|    tenant_column: |    columns:|      c: \{type: |text|jsonb|\}|upstream: |postgres://|keys:|  approval_ttl: |[0-9]+s|\n| |-|\[|\]|\{|\}|:|'|"|&|\*|!!){0,40}"#,
        ).expect("regex")
    ) {
        let _ = parse_policy(&text, "fuzz");
    }
}

/// Found by `sql_planner_and_literal_scanner_never_panic`: pg_query's
/// scanner aborted the process on SQL without tokens.
#[test]
fn sql_of_whitespace_only_is_scanned_without_aborting() {
    for sql in ["", " ", "\t\n\r\u{b}\u{c}", "-- c", "/* c */"] {
        let _ = rewrite::parameterize(sql);
        let _ = rewrite::fingerprint(sql);
        let _ = rewrite::analyze(&policy(), sql, 0);
    }
}

/// The same through an encrypting proxy (a debug build aborted on it).
#[tokio::test]
async fn whitespace_only_query_keeps_an_encrypting_proxy_serving() {
    use common::encryption::{rows, EncryptedSetup};
    use common::raw;
    let s = EncryptedSetup::start(
        "CREATE TABLE patients (id serial, tenant_id text, ssn bytea, cmk_edek jsonb)",
        "public.patients",
        &["ssn: {type: text}"],
    )
    .await;
    let mut session = raw::session(s.proxy.port(), "app");
    for sql in [" ", "", "\t\n"] {
        raw::send(&mut session, &raw::query(sql));
        let answer = raw::read_until_ready(&mut session);
        assert_eq!(
            answer.last().map(|m| m.tag),
            Some(b'Z'),
            "{sql:?}: {answer:?}"
        );
    }
    let app = s.app().await;
    assert_eq!(
        rows(&app, "SELECT 1").await,
        vec![vec![Some("1".to_owned())]]
    );
}
