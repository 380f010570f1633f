//! Running real client programs (psql, psycopg, node-postgres, pgJDBC,
//! SQLAlchemy) from `integration/` against a PostgreSQL + proxy with client
//! TLS (`verify-full`) and a verified upstream leg. The programs assert their
//! own results; the helpers here require exit code 0 and a clean summary
//! line. A missing runtime is a failure, never a skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cmk_proxy::localpg::LocalPostgres;

use super::{client_tls_files, start_proxy, Proxy};

/// Hang guard for one client program (a session takes a few seconds; a hung
/// cancel would otherwise wait for `pg_sleep(30)` and beyond).
pub const CLIENT_HANG_GUARD: Duration = Duration::from_secs(300);

/// Libpq/driver variables that would change what the client programs connect to.
pub const SCRUBBED_ENV: &[&str] = &[
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
    "PGTZ",
    "DATABASE_URL",
];

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fails (never skips) when a runtime the client needs is absent.
pub fn require(path: &Path, what: &str) {
    assert!(
        path.exists(),
        "{what} not found at {}: run scripts/install-deps.sh",
        path.display()
    );
}

/// Fails when `program` cannot be run at all.
pub fn require_command(program: &str, what: &str) {
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

/// Fails unless the compiled JDBC class `build/<class>.class` in
/// `integration/java` exists and is not older than its source; returns the
/// classpath (driver jar + build directory).
pub fn require_java_class(class: &str) -> String {
    require_command("java", "Java runtime");
    let jar = Path::new("/usr/share/java/postgresql.jar");
    require(jar, "pgJDBC (libpostgresql-jdbc-java)");
    let dir = repo().join("integration/java");
    let compiled = dir.join(format!("build/{class}.class"));
    require(
        &compiled,
        &format!("compiled JDBC client {class} (integration/java/build)"),
    );
    let modified = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .expect("stat")
    };
    assert!(
        modified(&compiled) >= modified(&dir.join(format!("{class}.java"))),
        "integration/java/build/{class}.class is older than {class}.java: run scripts/install-deps.sh"
    );
    format!("{}:{}", jar.display(), dir.join("build").display())
}

/// PostgreSQL (TLS) + proxy with client TLS and a verified upstream leg.
pub struct ClientSetup {
    /// The PostgreSQL (stopped on drop).
    pub pg: LocalPostgres,
    /// The proxy in front of it.
    pub proxy: Proxy,
    /// Holds the proxy's certificate, key and CA.
    pub tls_dir: tempfile::TempDir,
    /// CA that signed the proxy's client-facing certificate.
    pub client_ca: PathBuf,
}

impl ClientSetup {
    /// `DATABASE_URL` for the SCRAM user through the proxy.
    pub fn proxy_url(&self, sslmode: &str) -> String {
        format!(
            "{}?sslmode={sslmode}",
            self.proxy.url("scram_user", "scram_pw", "app")
        )
    }
}

/// Starts PostgreSQL, runs `prepare` on it (schema, keyring...), then a
/// proxy with client TLS, upstream `verify-full` and `extra_yaml` (keys,
/// tenants, tables; no top-level `tls:`).
pub fn tls_setup(extra_yaml: &str, prepare: impl FnOnce(&LocalPostgres)) -> ClientSetup {
    let pg = super::pg();
    prepare(&pg);
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
        "tls:\n  client: {{cert: {}, key: {}}}\n  upstream: {{mode: verify-full, ca: {}}}\n{extra_yaml}",
        cert.display(),
        key.display(),
        pg_ca.display()
    );
    let proxy = start_proxy(&pg, &yaml);
    ClientSetup {
        pg,
        proxy,
        tls_dir,
        client_ca,
    }
}

/// One client program run.
pub struct ClientRun<'a> {
    /// The program (an interpreter, or `bash`, `java`...).
    pub program: &'a Path,
    /// Its arguments.
    pub args: &'a [&'a str],
    /// Working directory.
    pub cwd: &'a Path,
    /// Environment set for the program (after scrubbing libpq variables).
    pub env: &'a [(&'a str, String)],
}

/// Runs the program; asserts exit code 0 and a `N passed, 0 failed` summary
/// line, printing the client's output and `proxy_log` otherwise. Returns the
/// output.
pub fn run_client_program(run: &ClientRun<'_>, proxy_log: impl Fn() -> String) -> String {
    let out_dir = tempfile::Builder::new()
        .prefix("cmk-client-out-")
        .tempdir()
        .expect("temp dir");
    let out_path = out_dir.path().join("output.txt");
    let out = std::fs::File::create(&out_path).expect("create output file");
    let err = out.try_clone().expect("clone output file");
    let mut cmd = Command::new(run.program);
    cmd.args(run.args)
        .current_dir(run.cwd)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    for (k, v) in run.env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot run {}: {e}: run scripts/install-deps.sh",
            run.program.display()
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
                "{} hung for {CLIENT_HANG_GUARD:?}; output so far:\n{}\n---- proxy log ----\n{}",
                run.program.display(),
                std::fs::read_to_string(&out_path).unwrap_or_default(),
                proxy_log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    let what = format!("{} {}", run.program.display(), run.args.join(" "));
    println!("---- {what} ----\n{output}");
    assert!(
        status.success(),
        "{what} exited with {status}\n---- client output ----\n{output}\n---- proxy log ----\n{}",
        proxy_log()
    );
    assert!(
        output.contains(" passed, 0 failed"),
        "client printed no clean summary line:\n{output}"
    );
    output
}

/// Runs `program args` with `DATABASE_URL` (SCRAM user, `sslmode`) and
/// `PGSSLROOTCERT` pointing at the proxy, plus `env`; see [`run_client_program`].
pub fn run_client(
    setup: &ClientSetup,
    sslmode: &str,
    program: &Path,
    args: &[&str],
    cwd: &Path,
    env: &[(&str, String)],
) -> String {
    let mut all = vec![
        ("DATABASE_URL", setup.proxy_url(sslmode)),
        ("PGSSLROOTCERT", setup.client_ca.display().to_string()),
    ];
    all.extend(env.iter().cloned());
    run_client_program(
        &ClientRun {
            program,
            args,
            cwd,
            env: &all,
        },
        || setup.proxy.log_text(),
    )
}
