//! Audit sinks end to end: JSON lines in files, per-tenant routing, HTTP
//! POSTs to a real (tiny) HTTP listener, back-pressure on a stalled sink,
//! and no key or value bytes anywhere in what is written.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use base64::Engine as _;
use cmk_proxy::audit::{Audit, AuditEvent};
use cmk_proxy::config::{AuditConfig, AuditOnFailure, AuditSink};
use cmk_proxy::crypto::{self, CellAad, Dek};
use cmk_proxy::kms::{KeyContext, KeyProvider, Keyring, LocalProvider};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use uuid::Uuid;

fn cfg(sink: AuditSink, queue_capacity: usize) -> AuditConfig {
    AuditConfig {
        sink,
        queue_capacity,
        on_failure: AuditOnFailure::Deny,
    }
}

/// An HTTP sink with the default batch and an in-memory spool.
pub fn http_sink(url: String) -> AuditSink {
    AuditSink::Http {
        url,
        batch_size: None,
        spool_dir: None,
        spool_max_bytes: None,
    }
}

/// The events of one POST body (JSON lines).
pub fn events_of(body: &[u8]) -> Vec<serde_json::Value> {
    body.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("a JSON event per line"))
        .collect()
}

fn kms_call(tenant: &str) -> AuditEvent {
    AuditEvent::KmsCall {
        tenant: tenant.to_owned(),
        provider: "local".to_owned(),
        key_ref: tenant.to_owned(),
        operation: "unwrap",
        outcome: "ok".to_owned(),
        latency_ms: 1.25,
    }
}

fn all_kinds(tenant: &str) -> Vec<AuditEvent> {
    vec![
        kms_call(tenant),
        AuditEvent::DecryptBatch {
            tenant: tenant.to_owned(),
            table: "public.patients".to_owned(),
            columns: vec!["ssn".to_owned(), "notes".to_owned()],
            rows: 3,
            fingerprint: "select ssn from patients where id = $1".to_owned(),
            client_addr: "127.0.0.1:5555".to_owned(),
            user: "app".to_owned(),
        },
        AuditEvent::Rejection {
            sqlstate: "KM003",
            reason: "ORDER BY on a protected column".to_owned(),
            tenant: Some(tenant.to_owned()),
            table: Some("public.patients".to_owned()),
            column: Some("ssn".to_owned()),
            client_addr: "127.0.0.1:5555".to_owned(),
            user: "app".to_owned(),
        },
        AuditEvent::KeyLifecycle {
            tenant: tenant.to_owned(),
            operation: "created",
            dek_id: Some(Uuid::new_v4()),
            detail: "epoch 1".to_owned(),
        },
    ]
}

fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

#[tokio::test]
async fn file_sink_lines_parse_as_json_with_ts_and_event() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let audit = Audit::start(&cfg(AuditSink::File { path: path.clone() }, 64)).unwrap();
    for e in all_kinds("acme") {
        audit.emit(e);
    }
    audit.flush().await;
    let lines = read_lines(&path);
    let kinds: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["kms_call", "decrypt_batch", "rejection", "key_lifecycle"]
    );
    for line in &lines {
        let ts = line["ts"].as_str().unwrap();
        chrono::DateTime::parse_from_rfc3339(ts).unwrap_or_else(|e| panic!("{ts}: {e}"));
        assert_eq!(line["tenant"], "acme");
    }
    assert_eq!(lines[0]["latency_ms"], 1.25);
    assert_eq!(lines[1]["columns"], serde_json::json!(["ssn", "notes"]));
    assert_eq!(lines[2]["sqlstate"], "KM003");
    assert_eq!(audit.dropped(), 0);
    assert_eq!(audit.failed(), 0);
}

#[tokio::test]
async fn file_sink_appends_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    for _ in 0..2 {
        let audit = Audit::start(&cfg(AuditSink::File { path: path.clone() }, 8)).unwrap();
        audit.emit(kms_call("acme"));
        audit.flush().await;
    }
    assert_eq!(read_lines(&path).len(), 2);
}

#[tokio::test]
async fn tenant_files_sink_splits_events_by_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let audit = Audit::start(&cfg(
        AuditSink::TenantFiles {
            dir: dir.path().join("tenants"),
        },
        64,
    ))
    .unwrap();
    audit.emit(kms_call("acme"));
    audit.emit(kms_call("globex"));
    audit.emit(kms_call("acme"));
    audit.emit(kms_call("../escape"));
    audit.emit(AuditEvent::Rejection {
        sqlstate: "KM004",
        reason: "no tenant".to_owned(),
        tenant: None,
        table: None,
        column: None,
        client_addr: "127.0.0.1:1".to_owned(),
        user: "app".to_owned(),
    });
    audit.flush().await;
    let acme = read_lines(&dir.path().join("tenants/acme.jsonl"));
    assert_eq!(acme.len(), 2);
    assert!(acme.iter().all(|l| l["tenant"] == "acme"));
    let globex = read_lines(&dir.path().join("tenants/globex.jsonl"));
    assert_eq!(globex.len(), 1);
    assert_eq!(globex[0]["tenant"], "globex");
    assert!(!dir.path().join("escape.jsonl").exists());
    assert_eq!(
        read_lines(&dir.path().join("tenants/%2E%2E%2Fescape.jsonl")).len(),
        1
    );
    let none = read_lines(&dir.path().join("tenants/.no-tenant.jsonl"));
    assert_eq!(none[0]["sqlstate"], "KM004");
}

#[tokio::test]
async fn per_tenant_sink_receives_only_its_tenants_events() {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("main.jsonl");
    let acme_file = dir.path().join("acme-siem.jsonl");
    let audit = Audit::start(&cfg(AuditSink::File { path: main.clone() }, 64)).unwrap();
    audit.set_tenant_sink(
        "acme",
        AuditSink::File {
            path: acme_file.clone(),
        },
    );
    for tenant in ["acme", "globex", "acme", "initech"] {
        for e in all_kinds(tenant) {
            audit.emit(e);
        }
    }
    audit.flush().await;
    let acme = read_lines(&acme_file);
    assert_eq!(acme.len(), 8);
    assert!(acme.iter().all(|l| l["tenant"] == "acme"), "{acme:?}");
    assert_eq!(
        read_lines(&main).len(),
        16,
        "the main sink still gets everything"
    );

    audit.set_tenant_sink("acme", AuditSink::None);
    audit.emit(kms_call("acme"));
    audit.flush().await;
    assert_eq!(
        read_lines(&acme_file).len(),
        8,
        "removed sink gets nothing more"
    );
}

/// One HTTP request as the test server saw it.
struct Seen {
    head: String,
    body: Vec<u8>,
}

/// A tiny HTTP/1.1 server: answers 200 to every request (keep-alive) and
/// reports each request on the channel.
async fn http_server() -> (String, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/audit", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())
                                .flatten()
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 4096];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = buf[head_end..head_end + len].to_vec();
                    buf.drain(..head_end + len);
                    let _ = tx.send(Seen { head, body });
                    if sock
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (url, rx)
}

#[tokio::test]
async fn http_sink_posts_events_as_json_lines_with_ids() {
    let (url, mut seen) = http_server().await;
    let audit = Audit::start(&cfg(http_sink(url), 64)).unwrap();
    for e in all_kinds("acme") {
        audit.emit(e);
    }
    audit.flush().await;
    let mut kinds = Vec::new();
    let mut ids = std::collections::HashSet::new();
    while kinds.len() < 4 {
        let req = seen.recv().await.unwrap();
        assert!(
            req.head.starts_with("POST /audit HTTP/1.1\r\n"),
            "{}",
            req.head
        );
        let head = req.head.to_ascii_lowercase();
        assert!(
            head.contains("content-type: application/json")
                || head.contains("content-type: application/x-ndjson"),
            "{}",
            req.head
        );
        for v in events_of(&req.body) {
            assert_eq!(v["tenant"], "acme");
            assert!(v["ts"].is_string());
            let id = v["id"].as_str().expect("an id per event");
            assert!(Uuid::parse_str(id).is_ok(), "{id}");
            assert!(ids.insert(id.to_owned()), "ids are unique");
            kinds.push(v["event"].as_str().unwrap().to_owned());
        }
    }
    kinds.sort();
    assert_eq!(
        kinds,
        ["decrypt_batch", "key_lifecycle", "kms_call", "rejection"]
    );
    assert_eq!(audit.failed(), 0);
    assert_eq!(audit.dropped(), 0);
}

#[tokio::test]
async fn per_tenant_http_sink_gets_only_its_tenant() {
    let (url, mut seen) = http_server().await;
    let audit = Audit::start(&cfg(AuditSink::None, 64)).unwrap();
    audit.set_tenant_sink("globex", http_sink(url));
    audit.emit(kms_call("acme"));
    audit.emit(kms_call("globex"));
    audit.emit(kms_call("acme"));
    audit.flush().await;
    let req = seen.recv().await.unwrap();
    let events = events_of(&req.body);
    assert_eq!(events.len(), 1, "only one event is globex's");
    assert_eq!(events[0]["tenant"], "globex");
    assert!(seen.try_recv().is_err(), "only one event is globex's");
}

#[tokio::test]
async fn stalled_http_sink_never_blocks_emit_and_counts_drops() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let mut config = cfg(
        AuditSink::Http {
            url,
            batch_size: None,
            spool_dir: None,
            spool_max_bytes: Some(16 * 1024),
        },
        8,
    );
    config.on_failure = AuditOnFailure::Allow;
    let audit = Audit::start(&config).unwrap();
    for i in 0..2_000 {
        audit.emit(kms_call(&format!("tenant-{i}")));
    }
    // flush still returns: a stalled POST ends at its timeout.
    audit.flush().await;
    assert!(audit.dropped() > 0, "dropped = {}", audit.dropped());
    assert!(
        audit.failed() > 0,
        "timed-out POSTs are counted as failures"
    );
    assert!(
        !audit.delivery_blocked("tenant-1"),
        "allow never pauses decrypts"
    );
}

#[tokio::test]
async fn bad_settings_are_refused_at_start() {
    assert!(Audit::start(&cfg(AuditSink::Stdout, 0)).is_err());
    let err = Audit::start(&cfg(http_sink("not a url".to_owned()), 8)).unwrap_err();
    assert!(err.to_string().contains("not a url"), "{err}");
    let err = Audit::start(&cfg(
        AuditSink::File {
            path: "/proc/definitely/not/writable.jsonl".into(),
        },
        8,
    ))
    .unwrap_err();
    assert!(err.to_string().contains("/proc/definitely"), "{err}");
    let disabled = Audit::disabled();
    disabled.emit(kms_call("acme"));
    disabled.flush().await;
    assert_eq!(disabled.dropped(), 0);
}

#[test]
fn start_outside_a_runtime_is_an_error() {
    assert!(Audit::start(&cfg(AuditSink::Stdout, 8)).is_err());
}

/// Everything the process logs through `tracing`, for the leak check.
fn captured_logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || CaptureWriter(Arc::clone(&sink)))
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        logs
    })
}

struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn written_logs_contain_no_key_or_value_bytes() {
    let logs = captured_logs();
    let dir = tempfile::tempdir().unwrap();
    let ring_path = dir.path().join("ring.json");
    let mut ring = Keyring::load_or_empty(&ring_path).unwrap();
    ring.create_key("acme").unwrap();
    ring.save().unwrap();
    let provider = LocalProvider::open(&ring_path).unwrap();

    let main = dir.path().join("audit.jsonl");
    let tenant_dir = dir.path().join("tenants");
    let (url, mut seen) = http_server().await;
    let file_audit = Audit::start(&cfg(AuditSink::File { path: main.clone() }, 64)).unwrap();
    file_audit.set_tenant_sink("acme", http_sink(url));
    let dir_audit = Audit::start(&cfg(
        AuditSink::TenantFiles {
            dir: tenant_dir.clone(),
        },
        64,
    ))
    .unwrap();
    let audits = [file_audit, dir_audit];
    let emit = |e: AuditEvent| {
        for a in &audits {
            a.emit(e.clone());
        }
    };

    // A realistic life: wrap, seal, open, a tampered cell, a revoked key.
    let dek = Dek::generate();
    let dek_id = Uuid::new_v4();
    let plaintext = "123-45-6789 very secret value";
    let ctx = KeyContext {
        tenant_id: "acme",
        dek_id,
    };
    let edek = provider.wrap("acme", &ctx, &dek).await.unwrap();
    emit(AuditEvent::KeyLifecycle {
        tenant: "acme".to_owned(),
        operation: "created",
        dek_id: Some(dek_id),
        detail: format!("{dek:?}"),
    });
    let aad = CellAad {
        tenant_id: "acme",
        table: "public.patients",
        column: "ssn",
    };
    let mut cell = crypto::seal(&dek, dek_id, &aad, plaintext.as_bytes());
    assert_eq!(
        crypto::open(&dek, &aad, &cell).unwrap(),
        plaintext.as_bytes()
    );
    let last = cell.len() - 1;
    cell[last] ^= 1;
    let integrity = crypto::open(&dek, &aad, &cell).unwrap_err();
    emit(AuditEvent::Rejection {
        sqlstate: "KM005",
        reason: integrity.to_string(),
        tenant: Some("acme".to_owned()),
        table: Some("public.patients".to_owned()),
        column: Some("ssn".to_owned()),
        client_addr: "127.0.0.1:1".to_owned(),
        user: "app".to_owned(),
    });
    let mut ring = Keyring::load(&ring_path).unwrap();
    ring.set_enabled("acme", false).unwrap();
    ring.save().unwrap();
    let denied = provider.unwrap("acme", &ctx, &edek).await.unwrap_err();
    tracing::warn!(error = %denied, debug = ?denied, "kms denied");
    emit(AuditEvent::KmsCall {
        tenant: "acme".to_owned(),
        provider: "local".to_owned(),
        key_ref: "acme".to_owned(),
        operation: "unwrap",
        outcome: denied.outcome(),
        latency_ms: 0.5,
    });
    emit(AuditEvent::DecryptBatch {
        tenant: "acme".to_owned(),
        table: "public.patients".to_owned(),
        columns: vec!["ssn".to_owned()],
        rows: 1,
        fingerprint: "select ssn from public.patients where id = $1".to_owned(),
        client_addr: "127.0.0.1:1".to_owned(),
        user: "app".to_owned(),
    });
    for a in &audits {
        a.flush().await;
    }

    let mut written = Vec::new();
    written.extend(std::fs::read(&main).unwrap());
    written.extend(std::fs::read(tenant_dir.join("acme.jsonl")).unwrap());
    let mut posted = 0;
    while posted < 4 {
        let body = seen.recv().await.unwrap().body;
        posted += events_of(&body).len();
        written.extend(body);
    }
    written.extend(logs.lock().unwrap().iter());
    let written = String::from_utf8_lossy(&written).to_lowercase();
    assert!(written.contains("kms denied"), "the log capture works");
    assert!(written.contains("km005"), "the audit capture works");

    let key = dek.expose_bytes();
    let forbidden = [
        hex::encode(key),
        base64::engine::general_purpose::STANDARD
            .encode(key)
            .to_lowercase(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(key)
            .to_lowercase(),
        plaintext.to_lowercase(),
        "123-45-6789".to_owned(),
        hex::encode(plaintext),
        format!("{:?}", key.to_vec()).to_lowercase(),
    ];
    for needle in &forbidden {
        assert!(
            !written.contains(needle.as_str()),
            "found {needle} in the logs"
        );
    }
}
