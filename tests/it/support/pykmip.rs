//! A real PyKMIP server (Debian package `python3-pykmip`) for the KMIP
//! tests: its own CA, server and client certificates (the client one with
//! the clientAuth usage PyKMIP requires), TLS 1.2 with client
//! authentication, an SQLite store in a temp dir, on a free 127.0.0.1 port;
//! killed on drop. The tenant's side (create, revoke, destroy) goes through
//! PyKMIP's own client (`kmip_admin.py`).
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

const SERVER: &str = "/usr/bin/pykmip-server";

/// A running PyKMIP server.
pub struct PyKmip {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes `ca.pem`, `server.pem`/`server.key` (for 127.0.0.1) and
/// `client.pem`/`client.key` into `dir`.
fn write_certificates(dir: &Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "kmip test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (name, sans, usage) in [
        (
            "server",
            vec!["127.0.0.1".to_owned()],
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        ("client", vec![], ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

impl PyKmip {
    /// Starts the server and waits until it accepts connections. Panics
    /// (the test fails, it is never skipped) when PyKMIP is not installed.
    pub fn start() -> PyKmip {
        assert!(
            Path::new(SERVER).exists(),
            "{SERVER} is missing: run scripts/install-deps.sh (Debian package python3-pykmip)"
        );
        let dir = tempfile::tempdir().unwrap();
        write_certificates(dir.path());
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port();
            let conf = dir.path().join("server.conf");
            let d = dir.path().display();
            std::fs::write(
                &conf,
                format!(
                    "[server]\nhostname=127.0.0.1\nport={port}\n\
                     certificate_path={d}/server.pem\nkey_path={d}/server.key\n\
                     ca_path={d}/ca.pem\nauth_suite=TLS1.2\npolicy_path={d}/policies\n\
                     enable_tls_client_auth=True\nlogging_level=WARNING\n\
                     database_path={d}/kmip.sqlite\n"
                ),
            )
            .unwrap();
            // Its own process group: PyKMIP forks workers that a kill of
            // the parent alone would leave running.
            let mut child = Command::new(SERVER)
                .process_group(0)
                .arg("-f")
                .arg(&conf)
                .arg("-l")
                .arg(dir.path().join("server.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {SERVER}: {e}"));
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_error = format!("pykmip-server exited with {status}");
                    break;
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return PyKmip { child, port, dir };
                }
                if Instant::now() > deadline {
                    kill_group(&mut child);
                    last_error = "pykmip-server did not listen within 60 s".to_owned();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("could not start PyKMIP: {last_error}");
    }

    /// `127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A file of the server's certificate set (`ca.pem`, `client.pem`, …).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A `keys.providers` entry for this server.
    pub fn provider_yaml(&self) -> String {
        format!(
            "{{kind: kmip, endpoint: \"{}\", ca: \"{}\", client_cert: \"{}\", client_key: \"{}\"}}",
            self.endpoint(),
            self.file("ca.pem").display(),
            self.file("client.pem").display(),
            self.file("client.key").display()
        )
    }

    fn admin(&self, args: &[&str]) -> String {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/support/kmip_admin.py");
        let out = Command::new("/usr/bin/python3")
            .arg(script)
            .arg(self.dir.path())
            .arg(self.port.to_string())
            .args(args)
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "kmip_admin {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Creates and activates an AES-256 key; returns its Unique Identifier.
    pub fn create_key(&self) -> String {
        self.admin(&["create"])
    }

    /// Creates and activates `count` AES-256 keys (one connection).
    pub fn create_keys(&self, count: usize) -> Vec<String> {
        self.admin(&["create", &count.to_string()])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Revokes the key (cessation of operation: state Deactivated).
    pub fn revoke(&self, uid: &str) {
        self.admin(&["revoke", uid]);
    }

    /// Revokes the key as compromised (state Compromised).
    pub fn compromise(&self, uid: &str) {
        self.admin(&["compromise", uid]);
    }

    /// Destroys a revoked key.
    pub fn destroy(&self, uid: &str) {
        self.admin(&["destroy", uid]);
    }
}

/// Kills the server and every process it forked.
fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for PyKmip {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}
