//! Real clients on encrypted columns: psql, psycopg 3, node-postgres and
//! pgJDBC each run `integration/<client>/encrypted.*` through the proxy (TLS
//! `verify-full` + SCRAM on both legs, local keyring, approval_ttl 1 s):
//! insert, update, upsert and read protected columns of every declared type
//! for two tenants, check the ciphertext at rest through a direct
//! connection, see one KM003 refusal, and see tenant globex refused with
//! KM001 after its key is disabled while acme keeps working, then restored.
//! Plus a SQLAlchemy app (`integration/sqlalchemy`) whose own pytest tests
//! pass directly against PostgreSQL (plaintext schema) and through the proxy
//! (encrypted schema) with no code change.
//!
//! What the programs get (see `integration/README.md`):
//! `DATABASE_URL` (proxy, SCRAM, `sslmode=verify-full`), `PGSSLROOTCERT`,
//! `CMK_DIRECT_URL` (PostgreSQL itself, superuser, no TLS),
//! `CMK_REVOKE_CMD` / `CMK_RESTORE_CMD` (shell commands disabling / enabling
//! the key of `CMK_REVOKED_TENANT`), `CMK_OTHER_TENANT`.

use crate::common;

use common::encryption::keyring;

use std::path::{Path, PathBuf};
use std::process::Command;

use cmk_proxy::localpg::LocalPostgres;
use common::clients::*;

/// The table every encrypted client program works on: one protected
/// column per declared type (stored as bytea), a blind index for `c_text`,
/// the EDEK column, and plaintext `id`, `tenant_id`, `label`.
const RECORDS_SCHEMA: &str = "CREATE TABLE records (\
    id int PRIMARY KEY, tenant_id text NOT NULL, label text, \
    c_text bytea, c_text_bidx bytea, c_varchar bytea, c_int2 bytea, c_int4 bytea, \
    c_int8 bytea, c_numeric bytea, c_float8 bytea, c_bool bytea, c_date bytea, \
    c_timestamp bytea, c_timestamptz bytea, c_uuid bytea, c_jsonb bytea, c_bytea bytea, \
    cmk_edek jsonb, CONSTRAINT cmk_bidx_c_text CHECK ((c_text IS NULL) = (c_text_bidx IS NULL))); \
    GRANT ALL ON records TO scram_user";

/// Protected columns of `records` and their declared types.
const RECORDS_COLUMNS: &[(&str, &str)] = &[
    ("c_text", "{type: text, search: equality}"),
    ("c_varchar", "{type: varchar}"),
    ("c_int2", "{type: int2}"),
    ("c_int4", "{type: int4}"),
    ("c_int8", "{type: int8}"),
    ("c_numeric", "{type: numeric}"),
    ("c_float8", "{type: float8}"),
    ("c_bool", "{type: bool}"),
    ("c_date", "{type: date}"),
    ("c_timestamp", "{type: timestamp}"),
    ("c_timestamptz", "{type: timestamptz}"),
    ("c_uuid", "{type: uuid}"),
    ("c_jsonb", "{type: jsonb}"),
    ("c_bytea", "{type: bytea}"),
];

/// Protected columns of the SQLAlchemy app's tables.
const APP_TABLES: &[(&str, &[(&str, &str)])] = &[(
    "public.patients",
    &[
        ("ssn", "{type: text, search: equality}"),
        ("birth_date", "{type: date}"),
        ("notes", "{type: text}"),
        ("weight_kg", "{type: numeric}"),
        ("allergies", "{type: jsonb}"),
        ("last_visit", "{type: timestamptz}"),
    ],
)];

const REVOKED: &str = "globex";
const OTHER: &str = "acme";

fn cmk_proxy_bin() -> &'static str {
    env!("CARGO_BIN_EXE_cmk-proxy")
}

/// Policy text (after `tls:`): local keyring with tenants acme and globex,
/// approval_ttl 1 s, and the given protected tables.
fn policy(ring: &Path, audit: &Path, tables: &[(&str, &[(&str, &str)])]) -> String {
    let mut yaml = format!(
        "keys:\n  approval_ttl: 1s\n  providers:\n    local: {{kind: local, path: {}}}\n\
         audit: {{sink: {{kind: file, path: {}}}}}\n\
         tenants:\n  acme: {{provider: local, key: acme}}\n  globex: {{provider: local, key: globex}}\n\
         tables:\n",
        ring.display(),
        audit.display()
    );
    for (table, columns) in tables {
        yaml.push_str(&format!(
            "  {table}:\n    tenant_column: tenant_id\n    columns:\n"
        ));
        for (column, spec) in *columns {
            yaml.push_str(&format!("      {column}: {spec}\n"));
        }
    }
    yaml
}

/// PostgreSQL with `schema_sql` applied, a keyring with keys for acme and
/// globex, and the proxy with an encryption policy for `tables`.
struct Encrypted {
    setup: ClientSetup,
    keys_dir: tempfile::TempDir,
}

impl Encrypted {
    fn start(schema_sql: &str, tables: &[(&str, &[(&str, &str)])]) -> Encrypted {
        let keys_dir = tempfile::Builder::new()
            .prefix("cmk-clients-keys-")
            .tempdir()
            .expect("temp dir");
        let ring = keys_dir.path().join("keyring.json");
        keyring(&ring, "create", "acme");
        keyring(&ring, "create", "globex");
        let yaml = policy(&ring, &keys_dir.path().join("audit.jsonl"), tables);
        let setup = tls_setup(&yaml, |pg| {
            pg.psql("app", schema_sql)
                .unwrap_or_else(|e| panic!("create schema: {e}"));
        });
        Encrypted { setup, keys_dir }
    }

    fn ring(&self) -> PathBuf {
        self.keys_dir.path().join("keyring.json")
    }

    fn keyring_cmd(&self, action: &str, tenant: &str) -> String {
        format!(
            "'{}' keyring {action} {tenant} --keyring '{}'",
            cmk_proxy_bin(),
            self.ring().display()
        )
    }

    /// The variables every encrypted client program gets besides
    /// `DATABASE_URL` and `PGSSLROOTCERT`.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CMK_DIRECT_URL", direct_url(&self.setup.pg)),
            ("CMK_REVOKE_CMD", self.keyring_cmd("disable", REVOKED)),
            ("CMK_RESTORE_CMD", self.keyring_cmd("enable", REVOKED)),
            ("CMK_REVOKED_TENANT", REVOKED.to_owned()),
            ("CMK_OTHER_TENANT", OTHER.to_owned()),
        ]
    }

    fn run(&self, program: &Path, args: &[&str], cwd: &Path) -> String {
        run_client(&self.setup, "verify-full", program, args, cwd, &self.env())
    }

    /// Rows of `sql` run directly on PostgreSQL (psql, unaligned, `|`-separated).
    fn direct(&self, sql: &str) -> String {
        self.setup
            .pg
            .psql("app", sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

/// PostgreSQL itself, as the superuser, without TLS.
fn direct_url(pg: &LocalPostgres) -> String {
    format!("{}?sslmode=disable", pg.admin_url("app"))
}

fn records() -> Encrypted {
    let table: &[(&str, &[(&str, &str)])] = &[("public.records", RECORDS_COLUMNS)];
    Encrypted::start(RECORDS_SCHEMA, table)
}

#[test]
fn psql_encrypted_columns_of_every_type_and_revocation() {
    require_command("psql", "psql (postgresql-client)");
    let script = repo().join("integration/psql/encrypted.sh");
    require(&script, "integration/psql/encrypted.sh");
    let e = records();
    e.run(
        Path::new("bash"),
        &[script.to_str().expect("utf-8 path")],
        &repo(),
    );
}

#[test]
fn python_psycopg_encrypted_columns_of_every_type_and_revocation() {
    let python = repo().join(".venv/bin/python");
    require(&python, "Python venv (.venv with psycopg)");
    let script = repo().join("integration/python/encrypted.py");
    require(&script, "integration/python/encrypted.py");
    let e = records();
    e.run(&python, &[script.to_str().expect("utf-8 path")], &repo());
}

#[test]
fn node_pg_encrypted_columns_of_every_type_and_revocation() {
    require_command("node", "Node.js");
    let dir = repo().join("integration/node");
    require(
        &dir.join("node_modules/pg/package.json"),
        "node-postgres (integration/node/node_modules)",
    );
    let e = records();
    e.run(Path::new("node"), &["encrypted.js"], &dir);
}

#[test]
fn java_jdbc_encrypted_columns_of_every_type_and_revocation() {
    let classpath = require_java_class("Encrypted");
    let e = records();
    e.run(
        Path::new("java"),
        &["-cp", &classpath, "Encrypted"],
        &repo().join("integration/java"),
    );
}

fn sqlalchemy_app() -> (PathBuf, PathBuf) {
    let python = repo().join(".venv/bin/python");
    require(&python, "Python venv (.venv with psycopg)");
    let dir = repo().join("integration/sqlalchemy");
    require(
        &dir.join("test_app.py"),
        "integration/sqlalchemy/test_app.py",
    );
    let found = Command::new(&python)
        .args(["-c", "import sqlalchemy, pytest"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "sqlalchemy or pytest missing in .venv: run scripts/install-deps.sh"
    );
    (python, dir)
}

fn schema_file(name: &str) -> String {
    let path = repo().join("integration/sqlalchemy").join(name);
    let sql =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    format!("{sql}\nGRANT ALL ON ALL TABLES IN SCHEMA public TO scram_user;\nGRANT ALL ON ALL SEQUENCES IN SCHEMA public TO scram_user;\n")
}

const PYTEST_ARGS: &[&str] = &[
    "-m",
    "pytest",
    "-q",
    "-p",
    "no:cacheprovider",
    "test_app.py",
];

#[test]
fn sqlalchemy_app_tests_pass_directly_against_postgres_with_the_plaintext_schema() {
    let (python, dir) = sqlalchemy_app();
    let pg = common::pg();
    pg.psql("app", &schema_file("schema_plain.sql"))
        .unwrap_or_else(|e| panic!("create plaintext schema: {e}"));
    let ca = pg.ca_cert_path().expect("PostgreSQL with TLS").to_owned();
    let env = [
        (
            "DATABASE_URL",
            format!(
                "{}?sslmode=verify-full",
                pg.url("scram_user", "scram_pw", "app")
            ),
        ),
        ("PGSSLROOTCERT", ca.display().to_string()),
    ];
    run_client_program(
        &ClientRun {
            program: &python,
            args: PYTEST_ARGS,
            cwd: &dir,
            env: &env,
        },
        String::new,
    );
}

#[test]
fn sqlalchemy_app_tests_pass_through_the_proxy_with_the_encrypted_schema() {
    let (python, dir) = sqlalchemy_app();
    let e = Encrypted::start(&schema_file("schema_encrypted.sql"), APP_TABLES);
    e.run(&python, PYTEST_ARGS, &dir);
    // The app's last test leaves its patients behind: at rest they are
    // envelopes with an EDEK, never the plaintext the app wrote.
    let at_rest = e.direct(
        "SELECT count(*), \
         count(*) FILTER (WHERE substr(ssn, 1, 4) = '\\x434d4b01'::bytea \
             AND substr(birth_date, 1, 4) = '\\x434d4b01'::bytea), \
         count(*) FILTER (WHERE cmk_edek IS NOT NULL AND ssn_bidx IS NOT NULL), \
         coalesce(bool_or(position(convert_to('123-45-', 'UTF8') IN ssn) > 0 \
             OR position(convert_to('penicillin', 'UTF8') IN coalesce(notes, ''::bytea)) > 0), false) \
         FROM patients",
    );
    let fields: Vec<&str> = at_rest.trim().split('|').collect();
    assert_eq!(fields.len(), 4, "{at_rest}");
    assert!(
        fields[0] != "0",
        "the app left no patients behind: {at_rest}"
    );
    assert_eq!(fields[0], fields[1], "every ssn is an envelope: {at_rest}");
    assert_eq!(fields[0], fields[2], "every row has an EDEK: {at_rest}");
    assert_eq!(fields[3], "f", "no plaintext at rest: {at_rest}");
}

/// The Django project's table, plaintext (directly) and encrypted (through
/// the proxy): ssn is searchable, notes protected.
const DJANGO_PLAIN: &str = "CREATE TABLE patients (id serial PRIMARY KEY, \
    tenant_id text NOT NULL, name text NOT NULL, ssn text NOT NULL, notes text); \
    GRANT ALL ON patients TO scram_user; GRANT ALL ON SEQUENCE patients_id_seq TO scram_user";
const DJANGO_ENCRYPTED: &str = "CREATE TABLE patients (id serial PRIMARY KEY, \
    tenant_id text NOT NULL, name text NOT NULL, ssn bytea NOT NULL, ssn_bidx bytea, \
    notes bytea, cmk_edek jsonb, \
    CONSTRAINT cmk_bidx_ssn CHECK ((ssn IS NULL) = (ssn_bidx IS NULL))); \
    CREATE INDEX ON patients (tenant_id, ssn_bidx); \
    GRANT ALL ON patients TO scram_user; GRANT ALL ON SEQUENCE patients_id_seq TO scram_user";
const DJANGO_TABLES: &[(&str, &[(&str, &str)])] = &[(
    "public.patients",
    &[
        ("ssn", "{type: text, search: equality}"),
        ("notes", "{type: text}"),
    ],
)];

/// The steps of the Django scenario's transcript.
fn transcript(output: &str) -> Vec<&str> {
    output
        .lines()
        .filter(|l| l.starts_with("{\"step\""))
        .collect()
}

/// Issue 16, point 3: a real Django project (psycopg 3 backend) creates,
/// gets, filters, save()s, update()s, bulk_creates (and upserts), looks up
/// by the searchable ssn, and deletes; directly against PostgreSQL with the
/// plaintext schema and through the proxy with the encrypted one, its
/// transcript is the same, and nothing it wrote is plaintext at rest.
#[test]
fn a_django_app_works_unchanged_through_the_proxy() {
    let python = repo().join(".venv/bin/python");
    require(&python, "Python venv (.venv with psycopg)");
    let dir = repo().join("integration/django");
    let found = Command::new(&python)
        .args(["-c", "import django, psycopg"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "django missing in .venv: run scripts/install-deps.sh"
    );

    let pg = common::pg();
    pg.psql("app", DJANGO_PLAIN)
        .unwrap_or_else(|e| panic!("create plaintext schema: {e}"));
    let ca = pg.ca_cert_path().expect("PostgreSQL with TLS").to_owned();
    let env = [
        (
            "DATABASE_URL",
            format!(
                "{}?sslmode=verify-full",
                pg.url("scram_user", "scram_pw", "app")
            ),
        ),
        ("PGSSLROOTCERT", ca.display().to_string()),
    ];
    let direct = run_client_program(
        &ClientRun {
            program: &python,
            args: &["scenario.py"],
            cwd: &dir,
            env: &env,
        },
        String::new,
    );

    let e = Encrypted::start(DJANGO_ENCRYPTED, DJANGO_TABLES);
    let proxied = e.run(&python, &["scenario.py"], &dir);
    assert_eq!(transcript(&direct).len(), 18, "{direct}");
    assert_eq!(transcript(&proxied), transcript(&direct));
    let at_rest = e.direct(
        "SELECT count(*), count(*) FILTER (WHERE substr(ssn, 1, 4) = '\\x434d4b01'::bytea \
             AND ssn_bidx IS NOT NULL AND cmk_edek IS NOT NULL), \
         coalesce(bool_or(position(convert_to('123-45-', 'UTF8') IN ssn) > 0 \
             OR position(convert_to('penicillin', 'UTF8') IN coalesce(notes, ''::bytea)) > 0), false) \
         FROM patients",
    );
    let fields: Vec<&str> = at_rest.trim().split('|').collect();
    assert_eq!(fields.len(), 3, "{at_rest}");
    assert_ne!(fields[0], "0", "{at_rest}");
    assert_eq!(
        fields[0], fields[1],
        "every ssn sealed and indexed: {at_rest}"
    );
    assert_eq!(fields[2], "f", "no plaintext at rest: {at_rest}");
}
