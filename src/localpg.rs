//! A throwaway local PostgreSQL cluster (initdb into a temp dir as a non-root
//! user, random port), used by `cmk-proxy dev` and the tests. It owns process
//! management and the test roles; it knows nothing about the proxy.
//!
//! `initdb` and role creation run once per machine into a cached template
//! (`<base>/cmk-proxy-pgtemplate-<version>-h<N>-<uid>`); each instance copies it, so
//! a cluster starts in well under a second. `<base>` is `$TMPDIR` when set,
//! else `/dev/shm` (memory: copies and fsync-free I/O are fast), else `/tmp`.

use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use nix::unistd::{Gid, Uid, User};

mod certs;
pub mod citus;

pub use certs::{write_ca_and_server_cert, write_self_signed_v1_cert, CertFiles};

/// Version of the template layout; bump it when the template contents change
/// so stale caches from older builds are not reused.
const TEMPLATE_LAYOUT: u32 = 2;

/// How many times a start is retried when the chosen port was taken meanwhile.
const PORT_ATTEMPTS: usize = 8;

/// Why a local cluster could not be prepared, started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum LocalPgError {
    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr (and the server log where relevant).
        stderr: String,
    },
    /// A command could not be started at all.
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file-system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The account running PostgreSQL cannot reach the data directory.
    #[error(
        "PostgreSQL runs as uid {uid} and cannot enter {} (mode {mode:o}); use a data dir whose parents are world-searchable (chmod o+x)",
        .dir.display()
    )]
    Unreachable {
        /// Uid of the cluster owner.
        uid: u32,
        /// The directory it cannot enter.
        dir: PathBuf,
        /// That directory's permission bits.
        mode: u32,
    },
    /// No PostgreSQL server binaries were found.
    #[error("no PostgreSQL binaries found (tried `pg_config --bindir`, /usr/lib/postgresql/*/bin and PATH)")]
    NoBinaries,
    /// Certificate generation failed.
    #[error("cannot generate TLS certificates: {0}")]
    Certificate(#[from] rcgen::Error),
    /// A user lookup failed.
    #[error("cannot look up system user {name}: {source}")]
    User {
        /// The user name.
        name: String,
        /// The errno.
        source: nix::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LocalPgError {
    let context = context.into();
    move |source| LocalPgError::Io { context, source }
}

/// Options of a local cluster.
#[derive(Debug, Clone)]
pub struct LocalPostgresOptions {
    /// Serve TLS (a fresh CA and a server certificate for `localhost`/`127.0.0.1`).
    pub tls: bool,
    /// `max_connections` of the server.
    pub max_connections: u32,
    /// Data directory to use (kept on drop); a temp dir (removed on drop) when absent.
    /// An existing cluster in it is reused.
    pub data_dir: Option<PathBuf>,
    /// Which certificate the server presents with `tls: true`.
    pub server_cert: ServerCert,
    /// `shared_preload_libraries` (e.g. `citus`); none when empty.
    pub preload: String,
}

impl Default for LocalPostgresOptions {
    fn default() -> Self {
        Self {
            tls: true,
            max_connections: 200,
            data_dir: None,
            server_cert: ServerCert::CaSigned,
            preload: String::new(),
        }
    }
}

/// The kind of certificate a local cluster serves TLS with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ServerCert {
    /// X.509 v3 for `localhost`/`127.0.0.1`, signed by a fresh CA.
    #[default]
    CaSigned,
    /// A self-signed X.509 **version 1** certificate (no extensions), as
    /// Citus makes and `openssl x509 -req` does; it is its own CA file.
    SelfSignedV1,
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), LocalPgError> {
    let mut f = fs::File::create(path).map_err(io_err(format!("create {}", path.display())))?;
    f.write_all(contents)
        .map_err(io_err(format!("write {}", path.display())))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("chmod {}", path.display())))
}

/// The PostgreSQL binaries and the account that runs them.
#[derive(Debug, Clone)]
struct Installation {
    bindir: PathBuf,
    version: String,
    /// `Some` when we are root and must switch to an unprivileged account.
    run_as: Option<(Uid, Gid)>,
}

impl Installation {
    fn get() -> Result<&'static Installation, LocalPgError> {
        static INSTALLATION: OnceLock<Installation> = OnceLock::new();
        if let Some(i) = INSTALLATION.get() {
            return Ok(i);
        }
        let found = Self::discover()?;
        Ok(INSTALLATION.get_or_init(|| found))
    }

    fn discover() -> Result<Installation, LocalPgError> {
        let bindir = find_bindir().ok_or(LocalPgError::NoBinaries)?;
        let out = run(Command::new(bindir.join("pg_ctl")).arg("--version"))?;
        // "pg_ctl (PostgreSQL) 15.8 (Debian 15.8-1)" -> "15.8"
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text
            .split_whitespace()
            .nth(2)
            .unwrap_or("unknown")
            .to_owned();
        let run_as = if Uid::effective().is_root() {
            Some(service_account()?)
        } else {
            None
        };
        Ok(Installation {
            bindir,
            version,
            run_as,
        })
    }

    fn bin(&self, name: &str) -> PathBuf {
        let p = self.bindir.join(name);
        if p.exists() {
            p
        } else {
            PathBuf::from(name)
        }
    }

    /// A command that runs as the cluster's owner, from a directory it can read.
    fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bin(name));
        cmd.current_dir(std::env::temp_dir()).stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        cmd
    }

    /// Fails early, with a hint, when the cluster owner cannot reach `dir`
    /// (e.g. a data dir under a root-only `mktemp -d` directory).
    fn check_reachable(&self, dir: &Path) -> Result<(), LocalPgError> {
        use std::os::unix::fs::MetadataExt;
        let Some((uid, _)) = self.run_as else {
            return Ok(());
        };
        for parent in dir.ancestors().skip(1) {
            let meta =
                fs::metadata(parent).map_err(io_err(format!("stat {}", parent.display())))?;
            if meta.mode() & 0o001 == 0 && meta.uid() != uid.as_raw() {
                return Err(LocalPgError::Unreachable {
                    uid: uid.as_raw(),
                    dir: parent.to_owned(),
                    mode: meta.mode() & 0o7777,
                });
            }
        }
        Ok(())
    }

    fn chown(&self, path: &Path) -> Result<(), LocalPgError> {
        if let Some((uid, gid)) = self.run_as {
            nix::unistd::chown(path, Some(uid), Some(gid)).map_err(|e| LocalPgError::Io {
                context: format!("chown {}", path.display()),
                source: e.into(),
            })?;
        }
        Ok(())
    }
}

fn find_bindir() -> Option<PathBuf> {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_server(&dir) {
                return Some(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_server(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Some(dir);
    }
    std::env::var_os("PATH").and_then(|path| std::env::split_paths(&path).find(|d| has_server(d)))
}

/// The unprivileged account: `postgres` if it exists, else a `cmkpg` system user.
fn service_account() -> Result<(Uid, Gid), LocalPgError> {
    for name in ["postgres", "cmkpg"] {
        let found = User::from_name(name).map_err(|source| LocalPgError::User {
            name: name.to_owned(),
            source,
        })?;
        if let Some(user) = found {
            return Ok((user.uid, user.gid));
        }
    }
    let mut cmd = Command::new("useradd");
    cmd.args([
        "--system",
        "--user-group",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        "cmkpg",
    ]);
    // A concurrent process may have created it first; the lookup decides.
    let created = run(&mut cmd);
    let lookup = User::from_name("cmkpg").map_err(|source| LocalPgError::User {
        name: "cmkpg".to_owned(),
        source,
    })?;
    match (lookup, created) {
        (Some(user), _) => Ok((user.uid, user.gid)),
        (None, Err(e)) => Err(e),
        (None, Ok(_)) => Err(LocalPgError::User {
            name: "cmkpg".to_owned(),
            source: nix::Error::ENOENT,
        }),
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion, failing with its stderr when it fails.
fn run(cmd: &mut Command) -> Result<Output, LocalPgError> {
    let out = cmd.output().map_err(|source| LocalPgError::Spawn {
        command: describe(cmd),
        source,
    })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(LocalPgError::Command {
            command: describe(cmd),
            status: out.status.to_string(),
            stderr: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ),
        })
    }
}

/// SQL run once in the template: the test roles and the `app` database.
const TEMPLATE_SQL: &str = "\
SET password_encryption = 'scram-sha-256';
CREATE ROLE scram_user LOGIN PASSWORD 'scram_pw';
CREATE ROLE plain_user LOGIN PASSWORD 'plain_pw';
SET password_encryption = 'md5';
CREATE ROLE md5_user LOGIN PASSWORD 'md5_pw';
\\connect template1
GRANT ALL ON SCHEMA public TO scram_user, md5_user, plain_user;
\\connect postgres
CREATE DATABASE app OWNER postgres;
GRANT ALL ON DATABASE app TO scram_user, md5_user, plain_user;
";

/// Returns the cached template data directory, building it on first use.
fn template(inst: &Installation) -> Result<PathBuf, LocalPgError> {
    let uid = Uid::current().as_raw();
    let name = format!(
        "cmk-proxy-pgtemplate-{}-h{TEMPLATE_LAYOUT}-{uid}",
        inst.version
    );
    let parent = base_dir();
    let final_dir = parent.join(&name);
    if final_dir.join("PG_VERSION").is_file() {
        return Ok(final_dir);
    }
    let build = tempfile::Builder::new()
        .prefix(&format!(".{name}-building-"))
        .tempdir_in(&parent)
        .map_err(io_err("create template build dir"))?;
    let dir = build.path().to_owned();
    inst.chown(&dir)?;
    run(inst.command("initdb").arg("-D").arg(&dir).args([
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
        "--no-instructions",
    ]))?;
    let mut conf = fs::OpenOptions::new()
        .append(true)
        .open(dir.join("postgresql.conf"))
        .map_err(io_err("open template postgresql.conf"))?;
    conf.write_all(b"\ninclude_if_exists = 'cmk.conf'\n")
        .map_err(io_err("write template postgresql.conf"))?;
    drop(conf);
    let setup_conf = format!(
        "listen_addresses = ''\nunix_socket_directories = '{}'\nport = 5432\nfsync = off\n",
        dir.display()
    );
    write_file(&dir.join("cmk.conf"), setup_conf.as_bytes(), 0o644)?;
    inst.chown(&dir.join("cmk.conf"))?;
    let log = dir.join("setup-log.txt");
    pg_ctl_start(inst, &dir, &log)?;
    let setup = run(inst
        .command("psql")
        .arg("-h")
        .arg(&dir)
        .args([
            "-p",
            "5432",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .arg("-f")
        .arg(write_setup_sql(&dir, inst)?));
    let stopped = pg_ctl(inst, &dir, &["stop", "-m", "fast"]);
    setup?;
    stopped?;
    for leftover in ["cmk.conf", "setup-log.txt", "setup.sql"] {
        fs::remove_file(dir.join(leftover)).map_err(io_err(format!("remove {leftover}")))?;
    }
    let dir = build.keep();
    match fs::rename(&dir, &final_dir) {
        Ok(()) => Ok(final_dir),
        Err(_) if final_dir.join("PG_VERSION").is_file() => {
            // Another process won the race; its template is as good as ours.
            let _ = fs::remove_dir_all(&dir);
            Ok(final_dir)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&dir);
            Err(LocalPgError::Io {
                context: format!("rename template to {}", final_dir.display()),
                source: e,
            })
        }
    }
}

fn write_setup_sql(dir: &Path, inst: &Installation) -> Result<PathBuf, LocalPgError> {
    let path = dir.join("setup.sql");
    write_file(&path, TEMPLATE_SQL.as_bytes(), 0o644)?;
    inst.chown(&path)?;
    Ok(path)
}

fn pg_ctl(inst: &Installation, dir: &Path, args: &[&str]) -> Result<Output, LocalPgError> {
    run(inst
        .command("pg_ctl")
        .arg("-D")
        .arg(dir)
        .args(["-w", "-t", "60"])
        .args(args))
}

fn pg_ctl_start(inst: &Installation, dir: &Path, log: &Path) -> Result<(), LocalPgError> {
    // The server's own libpq connections (Citus between nodes) look for
    // client certificates under $HOME/.postgresql; ours may be unreadable
    // to the cluster owner, so point it at the data directory.
    let started = run(inst
        .command("pg_ctl")
        .env("HOME", dir)
        .arg("-D")
        .arg(dir)
        .arg("-l")
        .arg(log)
        .args(["-w", "-t", "60", "start"]));
    match started {
        Ok(_) => Ok(()),
        Err(LocalPgError::Command {
            command,
            status,
            stderr,
        }) => {
            let log_text = fs::read_to_string(log).unwrap_or_default();
            Err(LocalPgError::Command {
                command,
                status,
                stderr: format!("{stderr}\n--- server log ---\n{log_text}"),
            })
        }
        Err(e) => Err(e),
    }
}

/// Where templates and throwaway clusters live: `$TMPDIR` if set, else
/// `/dev/shm` when writable, else the system temp dir.
fn base_dir() -> PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let usable = std::env::var_os("TMPDIR").is_none()
            && shm.is_dir()
            && tempfile::tempdir_in(shm).is_ok();
        if usable {
            shm.to_owned()
        } else {
            std::env::temp_dir()
        }
    })
    .clone()
}

fn free_port() -> Result<u16, LocalPgError> {
    let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .map_err(io_err("bind a free port"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(io_err("read local address"))
}

/// A running throwaway PostgreSQL cluster. Dropping it stops the server
/// (immediate mode) and removes its temp directory; a cluster in a given
/// `data_dir` is shut down cleanly (fast mode) and kept.
#[derive(Debug)]
pub struct LocalPostgres {
    inst: &'static Installation,
    data_dir: PathBuf,
    port: u16,
    ca_cert: Option<PathBuf>,
    temp: Option<tempfile::TempDir>,
}

impl LocalPostgres {
    /// Starts a cluster on a free 127.0.0.1 port (blocking).
    pub fn start(opts: LocalPostgresOptions) -> Result<Self, LocalPgError> {
        let inst = Installation::get()?;
        let (temp, data_dir) = match &opts.data_dir {
            Some(d) => {
                fs::create_dir_all(d).map_err(io_err(format!("create {}", d.display())))?;
                // Commands run from another directory (and as another user).
                let abs =
                    fs::canonicalize(d).map_err(io_err(format!("resolve {}", d.display())))?;
                inst.check_reachable(&abs)?;
                (None, abs)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("cmk-pg-")
                    .tempdir_in(base_dir())
                    .map_err(io_err("create temp data dir"))?;
                let p = t.path().to_owned();
                (Some(t), p)
            }
        };
        if !data_dir.join("PG_VERSION").is_file() {
            let template = template(inst)?;
            let mut src = template.into_os_string();
            src.push("/.");
            run(Command::new("cp").arg("-a").arg(src).arg(&data_dir))?;
        }
        fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod data dir"))?;
        inst.chown(&data_dir)?;
        let ca_cert = if opts.tls {
            let files = match opts.server_cert {
                ServerCert::CaSigned => {
                    write_ca_and_server_cert(&data_dir, &["localhost", "127.0.0.1"])?
                }
                ServerCert::SelfSignedV1 => write_self_signed_v1_cert(&data_dir)?,
            };
            for p in [&files.ca_cert, &files.cert, &files.key] {
                inst.chown(p)?;
            }
            Some(files.ca_cert)
        } else {
            None
        };
        let hba = pg_hba(opts.tls);
        write_file(&data_dir.join("pg_hba.conf"), hba.as_bytes(), 0o600)?;
        inst.chown(&data_dir.join("pg_hba.conf"))?;

        let mut pg = LocalPostgres {
            inst,
            data_dir,
            port: 0,
            ca_cert,
            temp,
        };
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            pg.port = free_port()?;
            pg.write_conf(&opts)?;
            match pg.start_again() {
                Ok(()) => return Ok(pg),
                Err(e) if e.to_string().contains("could not bind") => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or(LocalPgError::NoBinaries))
    }

    fn write_conf(&self, opts: &LocalPostgresOptions) -> Result<(), LocalPgError> {
        let ssl = if opts.tls {
            "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'ca.crt'\n"
        } else {
            "ssl = off\n"
        };
        let conf = format!(
            "listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{dir}'\n\
             max_connections = {max}\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             shared_buffers = 64MB\n\
             password_encryption = 'scram-sha-256'\n\
             log_min_messages = warning\n\
             log_connections = off\n\
             dynamic_shared_memory_type = mmap\n\
             shared_preload_libraries = '{preload}'\n\
             {ssl}",
            preload = opts.preload.replace('\'', ""),
            port = self.port,
            dir = self.data_dir.display(),
            max = opts.max_connections,
        );
        let path = self.data_dir.join("cmk.conf");
        write_file(&path, conf.as_bytes(), 0o644)?;
        self.inst.chown(&path)
    }

    /// Host the server listens on: `127.0.0.1`.
    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    /// TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Data directory of the cluster.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log (`log.txt` in the data directory).
    pub fn log_path(&self) -> PathBuf {
        self.data_dir.join("log.txt")
    }

    /// `postgres://postgres@127.0.0.1:PORT/db` (superuser, trust).
    pub fn admin_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, enc(db))
    }

    /// `postgres://user:password@127.0.0.1:PORT/db`.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{}",
            enc(user),
            enc(password),
            self.port,
            enc(db)
        )
    }

    /// Creates a database owned by `postgres`, with ALL granted to the test roles.
    pub fn create_database(&self, name: &str) -> Result<(), LocalPgError> {
        let ident = format!("\"{}\"", name.replace('"', "\"\""));
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {ident} OWNER postgres"),
        )?;
        self.psql(
            "postgres",
            &format!("GRANT ALL ON DATABASE {ident} TO scram_user, md5_user, plain_user"),
        )
        .map(drop)
    }

    /// Runs SQL as `postgres` with psql (blocking) and returns its stdout.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, LocalPgError> {
        let out = run(self
            .inst
            .command("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-X", "-q", "-A", "-t"])
            .args(["-v", "ON_ERROR_STOP=1", "-p"])
            .arg(self.port.to_string())
            .args(["-d", db, "-c", sql]))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// CA certificate (PEM) that signed the server certificate, with `tls: true`.
    pub fn ca_cert_path(&self) -> Option<&Path> {
        self.ca_cert.as_deref()
    }

    /// Fast shutdown; the data is kept for [`LocalPostgres::start_again`].
    pub fn stop(&self) -> Result<(), LocalPgError> {
        pg_ctl(self.inst, &self.data_dir, &["stop", "-m", "fast"]).map(drop)
    }

    /// Starts the (stopped) server again on the same port and data.
    pub fn start_again(&self) -> Result<(), LocalPgError> {
        pg_ctl_start(self.inst, &self.data_dir, &self.log_path())
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        // A throwaway cluster is killed; a kept one is shut down cleanly, since
        // with synchronous_commit off an immediate stop may lose the last commits.
        let mode = if self.temp.is_some() {
            "immediate"
        } else {
            "fast"
        };
        let _ = run(self
            .inst
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-w", "-t", "20", "stop", "-m", mode]));
        if let Some(t) = self.temp.take() {
            let _ = t.close();
        }
    }
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Client authentication: trust for `postgres`, one method per test role,
/// SCRAM for any other role a test creates.
fn pg_hba(tls: bool) -> String {
    let mut hba = String::from("local all all trust\n");
    let kinds: &[&str] = if tls { &["hostssl", "host"] } else { &["host"] };
    for kind in kinds {
        for net in ["127.0.0.1/32", "::1/128"] {
            for (user, method) in [
                ("postgres", "trust"),
                (
                    "cert_user",
                    if *kind == "hostssl" { "cert" } else { "reject" },
                ),
                ("scram_user", "scram-sha-256"),
                ("md5_user", "md5"),
                ("plain_user", "password"),
                ("all", "scram-sha-256"),
            ] {
                hba.push_str(&format!("{kind} all {user} {net} {method}\n"));
            }
        }
    }
    hba
}
