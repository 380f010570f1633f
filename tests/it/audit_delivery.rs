//! HTTP audit delivery that loses nothing silently: a receiver that goes
//! down for a while (503s, then nothing listening, then a lost answer) and
//! comes back gets every event, none twice after dropping duplicates by
//! id; a disk spool outlives a restart; with `on_failure: deny` a full
//! spool pauses the tenant's decrypts with KM007 until delivery resumes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cmk_proxy::audit::{Audit, AuditEvent};
use cmk_proxy::config::{AuditConfig, AuditOnFailure, AuditSink};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::common::encryption::{poll_until, rows, EncryptedSetup};
use crate::common::sqlstate;
use crate::ops_admin::{admin_yaml, sample, scrape};

/// How the receiver answers.
const UP: u8 = 0;
/// 503 without reading the events.
const FAILING: u8 = 1;
/// Keeps the events but answers 500 (the answer is "lost").
const LOSE_ANSWER: u8 = 2;

/// A SIEM stand-in: stores every event line it accepts, in arrival order.
pub struct Receiver {
    pub addr: SocketAddr,
    pub events: Arc<Mutex<Vec<serde_json::Value>>>,
    mode: Arc<AtomicU8>,
    server: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Listens on `addr` (port 0: any).
    pub async fn start(addr: SocketAddr) -> Receiver {
        let mut receiver = Receiver {
            addr,
            events: Arc::default(),
            mode: Arc::new(AtomicU8::new(UP)),
            server: None,
        };
        receiver.listen().await;
        receiver
    }

    async fn listen(&mut self) {
        let listener = TcpListener::bind(self.addr).await.expect("bind receiver");
        self.addr = listener.local_addr().unwrap();
        let (events, mode) = (self.events.clone(), self.mode.clone());
        self.server = Some(tokio::spawn(async move {
            // Connections end with the accept task (no keep-alive survives
            // `stop`).
            struct AbortAll(Vec<JoinHandle<()>>);
            impl Drop for AbortAll {
                fn drop(&mut self) {
                    for c in &self.0 {
                        c.abort();
                    }
                }
            }
            let mut connections = AbortAll(Vec::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    break;
                };
                let (events, mode) = (events.clone(), mode.clone());
                connections.0.push(tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (events, mode) = (events.clone(), mode.clone());
                            async move {
                                let mode = mode.load(Ordering::Acquire);
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let status = match mode {
                                    FAILING => StatusCode::SERVICE_UNAVAILABLE,
                                    _ => {
                                        let mut stored = events.lock().unwrap();
                                        for line in
                                            body.split(|b| *b == b'\n').filter(|l| !l.is_empty())
                                        {
                                            stored.push(
                                                serde_json::from_slice(line).expect("JSON line"),
                                            );
                                        }
                                        if mode == LOSE_ANSWER {
                                            StatusCode::INTERNAL_SERVER_ERROR
                                        } else {
                                            StatusCode::OK
                                        }
                                    }
                                };
                                let mut response = Response::new(Full::new(Bytes::new()));
                                *response.status_mut() = status;
                                Ok::<_, Infallible>(response)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                }));
                connections.0.retain(|c| !c.is_finished());
            }
        }));
    }

    fn set_mode(&self, mode: u8) {
        self.mode.store(mode, Ordering::Release);
    }

    /// Closes the port and every connection: connections are refused.
    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) {
        self.listen().await;
    }

    /// The events received, duplicates dropped by id, and the raw count.
    pub fn deduped(&self) -> (HashMap<String, serde_json::Value>, usize) {
        let events = self.events.lock().unwrap();
        let mut by_id = HashMap::new();
        for e in events.iter() {
            let id = e["id"].as_str().expect("every event has an id").to_owned();
            by_id.insert(id, e.clone());
        }
        (by_id, events.len())
    }

    /// Waits until `n` distinct events arrived (the limit guards a hang).
    pub async fn wait_for(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.deduped().0.len() < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} events arrived",
                self.deduped().0.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn event(i: usize) -> AuditEvent {
    AuditEvent::KeyLifecycle {
        tenant: "acme".to_owned(),
        operation: "created",
        dek_id: None,
        detail: format!("event {i}"),
    }
}

fn config(url: String, spool_dir: &std::path::Path) -> AuditConfig {
    AuditConfig {
        sink: AuditSink::Http {
            url,
            batch_size: Some(7),
            spool_dir: Some(spool_dir.to_path_buf()),
            spool_max_bytes: None,
        },
        queue_capacity: 1024,
        on_failure: AuditOnFailure::Deny,
    }
}

#[tokio::test]
async fn a_receiver_down_for_a_while_gets_every_event_once_after_dedupe() {
    let spool = tempfile::tempdir().unwrap();
    let mut receiver = Receiver::start("127.0.0.1:0".parse().unwrap()).await;
    let url = format!("http://{}/audit", receiver.addr);
    let audit = Audit::start(&config(url.clone(), spool.path())).unwrap();
    let mut emitted = 0;
    let mut emit = |audit: &Audit, n: usize| {
        for _ in 0..n {
            audit.emit(event(emitted));
            emitted += 1;
        }
    };

    emit(&audit, 20);
    audit.flush().await;
    receiver.wait_for(20).await;

    // Answers 503: events wait in the spool.
    receiver.set_mode(FAILING);
    emit(&audit, 30);
    audit.flush().await;
    // Nothing listens at all.
    receiver.stop().await;
    emit(&audit, 30);
    audit.flush().await;
    assert!(audit.failed() > 0, "failed POSTs are counted");
    assert_eq!(
        receiver.deduped().0.len(),
        20,
        "nothing got through meanwhile"
    );

    // The proxy restarts while the receiver is down: the disk spool keeps
    // the events for the next process.
    drop(audit);
    let audit = Audit::start(&config(url, spool.path())).unwrap();
    emit(&audit, 10);

    // Back, but the first answer is lost: that batch arrives twice.
    receiver.restart().await;
    receiver.set_mode(LOSE_ANSWER);
    let deadline = Instant::now() + Duration::from_secs(60);
    while receiver.events.lock().unwrap().len() <= 20 {
        assert!(
            Instant::now() < deadline,
            "no delivery after the receiver came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    receiver.set_mode(UP);
    receiver.wait_for(emitted).await;
    audit.flush().await;

    let (by_id, raw) = receiver.deduped();
    assert_eq!(by_id.len(), emitted, "every event arrived");
    assert!(
        raw > by_id.len(),
        "the lost answer made a batch arrive twice ({raw})"
    );
    let mut details: Vec<String> = by_id
        .values()
        .map(|e| e["detail"].as_str().unwrap().to_owned())
        .collect();
    details.sort();
    let mut want: Vec<String> = (0..emitted).map(|i| format!("event {i}")).collect();
    want.sort();
    assert_eq!(details, want, "each event exactly once after dedupe by id");
    assert_eq!(audit.dropped(), 0);
}

#[tokio::test]
async fn full_spool_with_deny_pauses_the_tenants_decrypts_until_delivery_resumes() {
    // Bound before the proxy starts and failing (503) until it "comes
    // back", so no other process can take its port meanwhile.
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap()).await;
    receiver.set_mode(FAILING);
    let addr = receiver.addr;
    let (admin, admin_port) = admin_yaml();
    let setup = EncryptedSetup::start_configured(
        crate::ops_admin::SCHEMA,
        "public.patients",
        &["ssn: {type: text}"],
        "",
        &format!(
            "acme: {{provider: local, key: acme, audit_sink: {{kind: http, url: 'http://{addr}/audit', spool_max_bytes: 4096}}}}"
        ),
        &admin,
    )
    .await;
    let app = setup.app().await;
    app.batch_execute(
        "INSERT INTO patients (tenant_id, ssn) VALUES ('acme', 'a-1'), ('globex', 'g-1')",
    )
    .await
    .unwrap();
    // The receiver fails: acme's events fill its spool.
    let acme = "SELECT ssn FROM patients WHERE tenant_id = 'acme'";
    let mut decrypted = 0usize;
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        match app.simple_query(acme).await {
            Ok(_) => decrypted += 1,
            Err(e) => break e,
        }
        assert!(Instant::now() < deadline, "acme's reads never stopped");
    };
    assert_eq!(sqlstate(&refused).as_deref(), Some("KM007"), "{refused:?}");
    assert!(
        crate::common::error_message(&refused).contains("audit"),
        "{refused:?}"
    );
    // Another tenant, whose events go elsewhere, reads on.
    assert_eq!(
        rows(&app, "SELECT ssn FROM patients WHERE tenant_id = 'globex'").await,
        vec![vec![Some("g-1".to_owned())]]
    );
    // The session stays usable after the refusal.
    assert_eq!(rows(&app, "SELECT 1").await.len(), 1);

    // The receiver comes back: the spool drains, acme reads again, and
    // every spooled event arrives.
    receiver.set_mode(UP);
    poll_until(false, || app.simple_query(acme)).await;
    decrypted += 1;
    let m = scrape(admin_port).await;
    assert!(
        sample(
            &m,
            "cmk_proxy_audit_events_retried_total",
            &[("sink", "http")]
        ) > 0.0
    );
    assert!(
        sample(
            &m,
            "cmk_proxy_audit_events_spooled_total",
            &[("sink", "http")]
        ) > 0.0
    );
    // Every decrypt of acme's cells reached acme's receiver, once after
    // dedupe (refusals that found the spool full are dropped and counted).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (by_id, _) = receiver.deduped();
        let batches = by_id
            .values()
            .filter(|e| e["event"] == "decrypt_batch")
            .count();
        assert!(
            batches <= decrypted,
            "{batches} decrypt events for {decrypted} reads"
        );
        if batches == decrypted {
            assert!(by_id.values().all(|e| e["tenant"] == "acme"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{batches} of {decrypted} decrypt events arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
