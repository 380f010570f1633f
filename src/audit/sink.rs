//! The writer side of the audit queue: turns events into JSON lines and
//! writes them to the configured sinks. Runs on its own thread.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use super::{http, AuditError, AuditEvent, Msg, Shared};
use crate::config::{AuditOnFailure, AuditSink};
use crate::ops::metrics::{metrics, SinkLabel};

/// File of events without a tenant in a `tenant-files` directory; tenant
/// names never produce a leading dot (see [`tenant_file_name`]).
const NO_TENANT_FILE: &str = ".no-tenant.jsonl";

#[derive(Serialize)]
struct Line<'a> {
    /// Unique per event (the same in every sink it goes to), so a receiver
    /// can drop a batch it sees again after a retry.
    id: uuid::Uuid,
    ts: String,
    #[serde(flatten)]
    event: &'a AuditEvent,
}

pub(super) struct Writer {
    main: AuditSink,
    on_failure: AuditOnFailure,
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    http: reqwest::Client,
    files: HashMap<PathBuf, BufWriter<File>>,
}

impl Writer {
    pub(super) fn new(
        main: AuditSink,
        on_failure: AuditOnFailure,
        shared: Arc<Shared>,
        runtime: tokio::runtime::Handle,
    ) -> Result<Writer, AuditError> {
        let mut writer = Writer {
            main,
            on_failure,
            shared,
            runtime,
            http: http::client()?,
            files: HashMap::new(),
        };
        // Fail at start-up, not at the first event, on an unusable main sink.
        check(&writer.main)?;
        writer.set_main(writer.main.clone())?;
        Ok(writer)
    }

    /// Makes `main` the main sink, starting its HTTP delivery if it has none.
    fn set_main(&mut self, main: AuditSink) -> Result<(), AuditError> {
        if http::delivery_key(&main).is_some() {
            self.delivery(&main)?;
        }
        *self
            .shared
            .main_key
            .write()
            .unwrap_or_else(|p| p.into_inner()) = http::delivery_key(&main);
        self.main = main;
        Ok(())
    }

    /// The delivery of an HTTP sink, started at its first use.
    fn delivery(&mut self, sink: &AuditSink) -> Result<Arc<http::Delivery>, AuditError> {
        let key = http::delivery_key(sink)
            .ok_or_else(|| AuditError::Config("not an HTTP sink".to_owned()))?;
        if let Some(found) = self.shared.delivery(&key) {
            return Ok(found);
        }
        let delivery = http::Delivery::start(
            sink,
            self.on_failure,
            &self.shared,
            self.http.clone(),
            &self.runtime,
        )?;
        self.shared
            .deliveries
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, Arc::clone(&delivery));
        Ok(delivery)
    }

    pub(super) fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Event(at, event) => self.write_event(at, &event),
            Msg::Flush(done) => {
                self.flush_files();
                let _ = done.send(());
            }
            Msg::Reopen(main, on_failure) => {
                self.flush_files();
                self.files.clear();
                self.on_failure = on_failure;
                if let Err(e) = self.set_main(main) {
                    self.shared.count_failure("audit reload", &e.to_string());
                }
                tracing::info!("audit sinks reopened");
            }
        }
    }

    fn write_event(&mut self, at: DateTime<Utc>, event: &AuditEvent) {
        let line = Line {
            id: uuid::Uuid::new_v4(),
            ts: at.to_rfc3339_opts(SecondsFormat::Micros, true),
            event,
        };
        let mut bytes = match serde_json::to_vec(&line) {
            Ok(b) => b,
            Err(e) => {
                self.shared.count_failure("encode", &e.to_string());
                return;
            }
        };
        bytes.push(b'\n');
        let tenant = event.tenant();
        let main = self.main.clone();
        self.write_to(&main, tenant, &bytes);
        let own = tenant.and_then(|t| {
            let sinks = match self.shared.tenant_sinks.read() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            sinks.get(t).cloned()
        });
        if let Some(sink) = own {
            self.write_to(&sink, tenant, &bytes);
        }
    }

    fn write_to(&mut self, sink: &AuditSink, tenant: Option<&str>, line: &[u8]) {
        if !matches!(sink, AuditSink::None) {
            metrics()
                .audit_emitted
                .get_or_create(&SinkLabel { sink: kind(sink) })
                .inc();
        }
        match sink {
            AuditSink::None => {}
            AuditSink::Stdout => {
                if let Err(e) = std::io::stdout().lock().write_all(line) {
                    self.shared.count_failure("stdout", &e.to_string());
                }
            }
            AuditSink::File { path } => self.append(path, line),
            AuditSink::TenantFiles { dir } => {
                let name = tenant.map_or_else(|| NO_TENANT_FILE.to_owned(), tenant_file_name);
                self.append(&dir.join(name), line);
            }
            AuditSink::Http { .. } => match self.delivery(sink) {
                Ok(delivery) => delivery.enqueue(&line[..line.len().saturating_sub(1)]),
                Err(e) => {
                    self.shared
                        .count_drop("http", "HTTP sink spool cannot open");
                    self.shared.count_failure("audit spool", &e.to_string());
                }
            },
        }
    }

    fn append(&mut self, path: &Path, line: &[u8]) {
        let result = self.file(path).and_then(|f| f.write_all(line));
        if let Err(e) = result {
            // Reopen on the next event (the file may have been rotated away).
            self.files.remove(path);
            self.shared
                .count_failure(&path.display().to_string(), &e.to_string());
        }
    }

    fn file(&mut self, path: &Path) -> std::io::Result<&mut BufWriter<File>> {
        if !self.files.contains_key(path) {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(path)?;
            self.files.insert(
                path.to_path_buf(),
                BufWriter::with_capacity(64 * 1024, file),
            );
        }
        self.files
            .get_mut(path)
            .ok_or_else(|| std::io::Error::other("audit file vanished"))
    }

    pub(super) fn flush_files(&mut self) {
        let mut failures = Vec::new();
        for (path, file) in &mut self.files {
            if let Err(e) = file.flush() {
                failures.push((path.clone(), e.to_string()));
            }
        }
        for (path, error) in failures {
            self.files.remove(&path);
            self.shared
                .count_failure(&path.display().to_string(), &error);
        }
    }
}

/// The sink's kind, as its metrics label.
pub(super) fn kind(sink: &AuditSink) -> &'static str {
    match sink {
        AuditSink::None => "none",
        AuditSink::Stdout => "stdout",
        AuditSink::File { .. } => "file",
        AuditSink::TenantFiles { .. } => "tenant-files",
        AuditSink::Http { .. } => "http",
    }
}

/// Fails on a main sink that cannot be used: a file that cannot be
/// opened for appending, a directory that cannot be created, a bad URL.
pub(super) fn check(sink: &AuditSink) -> Result<(), AuditError> {
    match sink {
        AuditSink::File { path } => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| AuditError::Io(format!("cannot create {}: {e}", dir.display())))?;
            }
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(path)
                .map_err(|e| AuditError::Io(format!("cannot open {}: {e}", path.display())))?;
        }
        AuditSink::TenantFiles { dir } => {
            std::fs::create_dir_all(dir)
                .map_err(|e| AuditError::Io(format!("cannot create {}: {e}", dir.display())))?;
        }
        AuditSink::Http {
            url,
            spool_dir,
            batch_size,
            ..
        } => {
            if *batch_size == Some(0) {
                return Err(AuditError::Config(
                    "audit http sink: batch_size must be at least 1".to_owned(),
                ));
            }
            if let Some(dir) = spool_dir {
                std::fs::create_dir_all(dir).map_err(|e| {
                    AuditError::Io(format!("cannot create spool_dir {}: {e}", dir.display()))
                })?;
            }
            reqwest::Url::parse(url)
                .map_err(|e| AuditError::Config(format!("audit sink url {url:?}: {e}")))?;
        }
        AuditSink::None | AuditSink::Stdout => {}
    }
    Ok(())
}

/// `<tenant>.jsonl` with every byte outside `[A-Za-z0-9_-]` (and any dot)
/// percent-encoded, so a tenant id can never escape the directory.
pub(super) fn tenant_file_name(tenant: &str) -> String {
    let mut name = String::with_capacity(tenant.len() + 6);
    for b in tenant.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            name.push(char::from(b));
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
    }
    if name.is_empty() {
        name.push('%');
    }
    name.push_str(".jsonl");
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_file_names_stay_inside_the_directory() {
        assert_eq!(tenant_file_name("acme"), "acme.jsonl");
        assert_eq!(tenant_file_name("a-b_c9"), "a-b_c9.jsonl");
        assert_eq!(
            tenant_file_name("../etc/passwd"),
            "%2E%2E%2Fetc%2Fpasswd.jsonl"
        );
        assert_eq!(tenant_file_name(".hidden"), "%2Ehidden.jsonl");
        assert_eq!(tenant_file_name(""), "%.jsonl");
        assert_ne!(tenant_file_name("a%2E"), tenant_file_name("a."));
    }

    #[test]
    fn lines_carry_ts_and_event_tag() {
        let event = AuditEvent::KeyLifecycle {
            tenant: "acme".into(),
            operation: "created",
            dek_id: None,
            detail: "epoch 1".into(),
        };
        let line = Line {
            id: uuid::Uuid::nil(),
            ts: "2026-01-01T00:00:00.000000Z".into(),
            event: &event,
        };
        let v: serde_json::Value = serde_json::to_value(&line).unwrap();
        assert_eq!(v["ts"], "2026-01-01T00:00:00.000000Z");
        assert_eq!(v["event"], "key_lifecycle");
        assert_eq!(v["tenant"], "acme");
        assert_eq!(v["operation"], "created");
    }
}
