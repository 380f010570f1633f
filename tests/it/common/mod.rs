//! Shared test support: a real PostgreSQL per test (`cmk_proxy::localpg`), the
//! real `cmk-proxy` binary started with a generated policy, and client helpers
//! (plain and TLS tokio-postgres connections, raw protocol bytes).
#![allow(dead_code)]

pub mod encryption;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cmk_proxy::localpg::{LocalPostgres, LocalPostgresOptions};
use futures_util::{stream, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// How long the proxy may take to start listening before the test fails.
const PROXY_START_TIMEOUT: Duration = Duration::from_secs(20);

/// A PostgreSQL with TLS on and the default options.
pub fn pg() -> LocalPostgres {
    pg_with(LocalPostgresOptions::default())
}

/// A PostgreSQL with the given options.
pub fn pg_with(opts: LocalPostgresOptions) -> LocalPostgres {
    LocalPostgres::start(opts).unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}"))
}

/// A free TCP port on 127.0.0.1 (free when asked; a start retries on a clash).
pub fn free_port() -> u16 {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free port")
}

/// A running `cmk-proxy serve` process. Killed (SIGKILL) on drop unless it
/// has already exited.
pub struct Proxy {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Proxy {
    /// Starts `cmk-proxy serve --config <file>` where the file is
    /// `listen: 127.0.0.1:<free port>` followed by `yaml`, plus `args`.
    /// Waits until the port accepts connections; panics with the log if the
    /// process exits or does not listen within 20 s.
    pub fn start(yaml: &str, args: &[&str]) -> Proxy {
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = free_port();
            match Self::try_start(port, &format!("listen: 127.0.0.1:{port}\n{yaml}"), args) {
                Ok(proxy) => return proxy,
                Err(log) if log.contains("in use") => last_log = log,
                Err(log) => panic!("cmk-proxy did not start listening on {port}:\n{log}"),
            }
        }
        panic!("cmk-proxy could not find a free port:\n{last_log}");
    }

    /// Starts `cmk-proxy serve --config <file with config_text> <args>` and
    /// waits for `port` to accept (the caller decides where it listens).
    pub fn start_listening_on(port: u16, config_text: &str, args: &[&str]) -> Proxy {
        Self::try_start(port, config_text, args)
            .unwrap_or_else(|log| panic!("cmk-proxy did not start listening on {port}:\n{log}"))
    }

    fn try_start(port: u16, config_text: &str, args: &[&str]) -> Result<Proxy, String> {
        let dir = tempfile::Builder::new()
            .prefix("cmk-proxy-test-")
            .tempdir()
            .expect("temp dir");
        let config = dir.path().join("policy.yaml");
        std::fs::write(&config, config_text).expect("write policy");
        let log = dir.path().join("proxy.log");
        let out = std::fs::File::create(&log).expect("create log");
        let err = out.try_clone().expect("clone log");
        let child = Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn cmk-proxy");
        let mut proxy = Proxy {
            child,
            port,
            dir,
            log,
            exited: None,
        };
        proxy.wait_listening().map(|()| proxy)
    }

    fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + PROXY_START_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = Some(status);
                return Err(format!("exited with {status}\n{}", self.log_text()));
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("timed out\n{}", self.log_text()))
    }

    /// The policy file the proxy was started with (for CLI commands).
    pub fn config_path(&self) -> std::path::PathBuf {
        self.dir.path().join("policy.yaml")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The port the proxy listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://user:password@127.0.0.1:<proxy port>/db`.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        if password.is_empty() {
            format!("postgres://{user}@127.0.0.1:{}/{db}", self.port)
        } else {
            format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port)
        }
    }

    /// Directory holding the policy and log (deleted with the proxy).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the proxy wrote to stdout and stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("send SIGTERM");
    }

    /// Blocks until the process exits.
    pub fn wait_exit(&mut self) -> ExitStatus {
        if let Some(s) = self.exited {
            return s;
        }
        let status = self.child.wait().expect("wait for cmk-proxy");
        self.exited = Some(status);
        status
    }

    /// Waits for the process to exit for at most `limit` (a hang guard, not a
    /// speed check); `None` if it is still running.
    pub fn wait_exit_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.exited {
                return Some(s);
            }
            if let Ok(Some(s)) = self.child.try_wait() {
                self.exited = Some(s);
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident set size of the proxy (VmRSS), KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// Peak resident set size of the proxy (VmHWM), KiB.
    pub fn hwm_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// Number of open file descriptors of the proxy (sockets included).
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .expect("read /proc/<pid>/fd")
            .count()
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.exited.is_none() && !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- cmk-proxy log ----\n{}", self.log_text());
        }
    }
}

/// The policy text (without `listen`) for a passthrough proxy in front of
/// `pg`: upstream `admin_url("app")`, `tls.upstream.mode: require` unless
/// `extra_yaml` has its own top-level `tls:`, then `extra_yaml`.
pub fn proxy_yaml(pg: &LocalPostgres, extra_yaml: &str) -> String {
    let mut yaml = format!("upstream: {}\n", pg.admin_url("app"));
    let has_tls = extra_yaml.lines().any(|l| l.starts_with("tls:"));
    if !has_tls {
        yaml.push_str("tls:\n  upstream: {mode: require}\n");
    }
    yaml.push_str(extra_yaml);
    if !yaml.ends_with('\n') {
        yaml.push('\n');
    }
    yaml
}

/// Starts a passthrough proxy in front of `pg` (see [`proxy_yaml`]).
pub fn start_proxy(pg: &LocalPostgres, extra_yaml: &str) -> Proxy {
    Proxy::start(&proxy_yaml(pg, extra_yaml), &[])
}

/// Like [`start_proxy`], with extra command-line arguments.
pub fn start_proxy_args(pg: &LocalPostgres, extra_yaml: &str, args: &[&str]) -> Proxy {
    Proxy::start(&proxy_yaml(pg, extra_yaml), args)
}

/// Certificate, key and CA (PEM paths) for the proxy's client-facing TLS,
/// valid for `localhost` and `127.0.0.1`.
pub fn client_tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let files = cmk_proxy::localpg::write_ca_and_server_cert(dir, &["localhost", "127.0.0.1"])
        .expect("generate client TLS files");
    (files.cert, files.key, files.ca_cert)
}

/// YAML for `tls.client` with freshly generated files in `dir`; returns the CA path too.
pub fn client_tls_yaml(dir: &Path, upstream_mode: &str) -> (String, PathBuf) {
    let (cert, key, ca) = client_tls_files(dir);
    (
        format!(
            "tls:\n  client: {{cert: {}, key: {}}}\n  upstream: {{mode: {upstream_mode}}}\n",
            cert.display(),
            key.display()
        ),
        ca,
    )
}

/// Connects without TLS and drives the connection on a task.
pub async fn connect(url: &str) -> (Client, JoinHandle<()>) {
    try_connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e} ({e:?})"))
}

/// Whether PostgreSQL sees `client`'s session over TLS (`pg_stat_ssl`).
pub async fn server_sees_tls(client: &Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("read pg_stat_ssl")
        .get(0)
}

/// Runs the `cmk-proxy` binary: whether it succeeded, and stdout + stderr.
pub fn run_cmk_proxy<I, S>(args: I) -> (bool, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let (code, text) = run_cmk_proxy_code(args);
    (code == Some(0), text)
}

/// Runs the `cmk-proxy` binary: its exit code, and stdout + stderr.
pub fn run_cmk_proxy_code<I, S>(args: I) -> (Option<i32>, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
        .args(args)
        .output()
        .expect("run cmk-proxy");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// Connects without TLS; the error is returned for the test to inspect.
pub async fn try_connect(url: &str) -> Result<(Client, JoinHandle<()>), tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    let handle = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((client, handle))
}

/// Connects without TLS and forwards notices and notifications to a channel.
pub async fn connect_with_messages(
    url: &str,
) -> (
    Client,
    JoinHandle<()>,
    mpsc::UnboundedReceiver<AsyncMessage>,
) {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = tokio::spawn(async move {
        let mut messages = stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if tx.send(m).is_err() {
                // The test stopped listening; keep driving the connection.
                continue;
            }
        }
    });
    (client, handle, rx)
}

/// A rustls client configuration trusting only the CA in `ca_path`.
pub fn rustls_client_config(ca_path: &Path) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_path).expect("read CA");
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.expect("parse CA")).expect("add CA");
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Connects with TLS (`sslmode=require` is added unless present), verifying
/// the server certificate against the CA in `ca_path`.
pub async fn connect_tls(url: &str, ca_path: &Path) -> (Client, JoinHandle<()>) {
    try_connect_tls(url, ca_path)
        .await
        .unwrap_or_else(|e| panic!("connect (TLS) {url}: {e} ({e:?})"))
}

/// Like [`connect_tls`], returning the error.
pub async fn try_connect_tls(
    url: &str,
    ca_path: &Path,
) -> Result<(Client, JoinHandle<()>), tokio_postgres::Error> {
    let url = if url.contains("sslmode=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&sslmode=require")
    } else {
        format!("{url}?sslmode=require")
    };
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(rustls_client_config(ca_path));
    let (client, connection) = tokio_postgres::connect(&url, tls).await?;
    let handle = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((client, handle))
}

/// The SQLSTATE of a tokio-postgres error, if the server sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.code().map(|c| c.code().to_owned())
}

/// The message of the server's ErrorResponse, or the error's text.
pub fn error_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| format!("{e}"))
}

/// Polls pg_stat_activity until a backend runs `query` (hang guard: 20 s).
pub async fn wait_for_activity(admin: &tokio_postgres::Client, query: &str) {
    for _ in 0..400 {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'",
                &[&query],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no backend ever ran {query}");
}

pub mod clients;

/// Raw protocol helpers for tests that send bytes a driver never would.
pub mod raw {
    use super::*;

    /// A StartupMessage (protocol 3.0) with `user` and `database`.
    pub fn startup(user: &str, database: &str) -> Vec<u8> {
        startup_with(196_608, &[("user", user), ("database", database)])
    }

    /// A StartupMessage of protocol `version` with `params`.
    pub fn startup_with(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&version.to_be_bytes());
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        msg.extend_from_slice(&body);
        msg
    }

    /// A frontend message: tag, length, body.
    pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut msg = vec![tag];
        msg.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        msg.extend_from_slice(body);
        msg
    }

    /// A simple Query message.
    pub fn query(sql: &str) -> Vec<u8> {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        message(b'Q', &body)
    }

    /// A backend message read from a socket.
    #[derive(Debug, Clone)]
    pub struct BackendMessage {
        /// Message tag.
        pub tag: u8,
        /// Message body (without tag and length).
        pub body: Vec<u8>,
    }

    impl BackendMessage {
        /// Field `code` of an ErrorResponse / NoticeResponse (e.g. `b'C'` for SQLSTATE).
        pub fn field(&self, code: u8) -> Option<String> {
            let mut rest = &self.body[..];
            while let Some((&c, tail)) = rest.split_first() {
                if c == 0 {
                    break;
                }
                let end = tail.iter().position(|&b| b == 0)?;
                if c == code {
                    return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
                }
                rest = &tail[end + 1..];
            }
            None
        }
    }

    /// Connects to `port` with read timeouts (a hang guard for the test).
    pub fn connect(port: u16) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect raw");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        s
    }

    /// Reads one backend message; `None` on EOF or reset.
    pub fn read_message(s: &mut TcpStream) -> Option<BackendMessage> {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).ok()?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len.checked_sub(4)?];
        s.read_exact(&mut body).ok()?;
        Some(BackendMessage { tag: head[0], body })
    }

    /// Reads messages until ReadyForQuery (`Z`) or an ErrorResponse (`E`)
    /// during startup, or EOF; returns all read.
    pub fn read_until_ready(s: &mut TcpStream) -> Vec<BackendMessage> {
        let mut out = Vec::new();
        while let Some(m) = read_message(s) {
            let tag = m.tag;
            out.push(m);
            if tag == b'Z' {
                break;
            }
        }
        out
    }

    /// Sends bytes, ignoring a reset (the peer may already have closed).
    pub fn send(s: &mut TcpStream, bytes: &[u8]) {
        let _ = s.write_all(bytes);
        let _ = s.flush();
    }

    /// A trust-authenticated session as `postgres` on `db`, ready for queries.
    pub fn session(port: u16, db: &str) -> TcpStream {
        let mut s = connect(port);
        send(&mut s, &startup("postgres", db));
        let msgs = read_until_ready(&mut s);
        assert!(
            msgs.last().map(|m| m.tag) == Some(b'Z'),
            "startup did not reach ReadyForQuery: {msgs:?}"
        );
        s
    }
}
