//! Real client libraries through the proxy: psql, psycopg 3, node-postgres and
//! pgJDBC each run a full session (TLS with certificate verification, SCRAM,
//! DDL, prepared statements, rollback, COPY, cancel) from `integration/`.
//! The client programs assert their own results; these tests start PostgreSQL
//! and the proxy, run one program, and require exit code 0.
//! A missing client runtime is a failure ("run scripts/install-deps.sh").

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cmk_proxy::localpg::LocalPostgres;
use common::*;

/// Hang guard for one client program (a session takes a few seconds; a hung
/// cancel would otherwise wait for `pg_sleep(30)` and beyond).
const CLIENT_HANG_GUARD: Duration = Duration::from_secs(300);

/// Libpq/driver variables that would change what the client programs connect to.
const SCRUBBED_ENV: &[&str] = &[
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGDATABASE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGSSLMODE",
    "PGSSLCERT",
    "PGSSLKEY",
    "PGSSLCRL",
    "PGCHANNELBINDING",
    "PGOPTIONS",
    "PGREQUIRESSL",
    "PGSSLNEGOTIATION",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fails (never skips) when a runtime the client needs is absent.
fn require(path: &Path, what: &str) {
    assert!(
        path.exists(),
        "{what} not found at {}: run scripts/install-deps.sh",
        path.display()
    );
}

/// Fails when `program` cannot be run at all.
fn require_command(program: &str, what: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "{what} (`{program}`) not found on PATH: run scripts/install-deps.sh"
    );
}

/// PostgreSQL (TLS) + proxy with client TLS and a verified upstream leg.
struct Setup {
    _pg: LocalPostgres,
    proxy: Proxy,
    _tls_dir: tempfile::TempDir,
    client_ca: PathBuf,
}

fn setup() -> Setup {
    let pg = pg();
    let tls_dir = tempfile::Builder::new()
        .prefix("cmk-clients-tls-")
        .tempdir()
        .expect("temp dir");
    let (cert, key, client_ca) = client_tls_files(tls_dir.path());
    let pg_ca = pg
        .ca_cert_path()
        .expect("PostgreSQL started with TLS")
        .to_owned();
    let yaml = format!(
        "tls:\n  client: {{cert: {}, key: {}}}\n  upstream: {{mode: verify-full, ca: {}}}\n",
        cert.display(),
        key.display(),
        pg_ca.display()
    );
    let proxy = start_proxy(&pg, &yaml);
    Setup {
        _pg: pg,
        proxy,
        _tls_dir: tls_dir,
        client_ca,
    }
}

/// Runs `program args` with `DATABASE_URL` (SCRAM user, `sslmode`) and
/// `PGSSLROOTCERT` pointing at the proxy; asserts exit code 0 and prints the
/// client's output (and the proxy log) otherwise.
fn run_client(setup: &Setup, sslmode: &str, program: &Path, args: &[&str], cwd: &Path) {
    let url = format!(
        "{}?sslmode={sslmode}",
        setup.proxy.url("scram_user", "scram_pw", "app")
    );
    let out_dir = tempfile::Builder::new()
        .prefix("cmk-client-out-")
        .tempdir()
        .expect("temp dir");
    let out_path = out_dir.path().join("output.txt");
    let out = std::fs::File::create(&out_path).expect("create output file");
    let err = out.try_clone().expect("clone output file");
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(cwd)
        .env("DATABASE_URL", &url)
        .env("PGSSLROOTCERT", &setup.client_ca)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot run {}: {e}: run scripts/install-deps.sh",
            program.display()
        )
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for client") {
            break status;
        }
        if started.elapsed() > CLIENT_HANG_GUARD {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} hung for {CLIENT_HANG_GUARD:?}; output so far:\n{}",
                program.display(),
                std::fs::read_to_string(&out_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    println!(
        "---- {} {} ----\n{output}",
        program.display(),
        args.join(" ")
    );
    assert!(
        status.success(),
        "{} {} exited with {status}\n---- client output ----\n{output}\n---- proxy log ----\n{}",
        program.display(),
        args.join(" "),
        setup.proxy.log_text()
    );
    assert!(
        output.contains(" passed, 0 failed"),
        "client printed no clean summary line:\n{output}"
    );
}

#[test]
fn psql_session_through_proxy_over_tls_scram() {
    require_command("psql", "psql (postgresql-client)");
    let script = repo().join("integration/psql/session.sh");
    require(&script, "integration/psql/session.sh");
    let setup = setup();
    run_client(
        &setup,
        "verify-full",
        Path::new("bash"),
        &[script.to_str().expect("utf-8 path")],
        &repo(),
    );
}

#[test]
fn python_psycopg_session_through_proxy_over_tls_scram() {
    let python = repo().join(".venv/bin/python");
    require(&python, "Python venv (.venv with psycopg)");
    let script = repo().join("integration/python/session.py");
    require(&script, "integration/python/session.py");
    let setup = setup();
    run_client(
        &setup,
        "verify-full",
        &python,
        &[script.to_str().expect("utf-8 path")],
        &repo(),
    );
}

#[test]
fn node_pg_session_through_proxy_over_tls_scram() {
    require_command("node", "Node.js");
    let dir = repo().join("integration/node");
    require(
        &dir.join("node_modules/pg/package.json"),
        "node-postgres (integration/node/node_modules)",
    );
    let setup = setup();
    run_client(
        &setup,
        "verify-full",
        Path::new("node"),
        &["session.js"],
        &dir,
    );
}

#[test]
fn java_jdbc_session_through_proxy_over_tls_scram() {
    require_command("java", "Java runtime");
    let jar = Path::new("/usr/share/java/postgresql.jar");
    require(jar, "pgJDBC (libpostgresql-jdbc-java)");
    let dir = repo().join("integration/java");
    let class = dir.join("build/Session.class");
    require(&class, "compiled JDBC client (integration/java/build)");
    let modified = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .expect("stat")
    };
    assert!(
        modified(&class) >= modified(&dir.join("Session.java")),
        "integration/java/build/Session.class is older than Session.java: run scripts/install-deps.sh"
    );
    let classpath = format!("{}:{}", jar.display(), dir.join("build").display());
    let setup = setup();
    run_client(
        &setup,
        "verify-full",
        Path::new("java"),
        &["-cp", &classpath, "Session"],
        &dir,
    );
}

#[test]
fn psql_session_through_proxy_with_sslmode_require() {
    require_command("psql", "psql (postgresql-client)");
    let script = repo().join("integration/psql/session.sh");
    require(&script, "integration/psql/session.sh");
    let setup = setup();
    run_client(
        &setup,
        "require",
        Path::new("bash"),
        &[script.to_str().expect("utf-8 path")],
        &repo(),
    );
}
