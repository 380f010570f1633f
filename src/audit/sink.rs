//! The writer side of the audit queue: turns events into JSON lines and
//! writes them to the configured sinks. Runs on its own thread.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use super::{AuditError, AuditEvent, Msg, Shared};
use crate::config::AuditSink;

/// Whole-request timeout of one HTTP POST.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);
const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// File of events without a tenant in a `tenant-files` directory; tenant
/// names never produce a leading dot (see [`tenant_file_name`]).
const NO_TENANT_FILE: &str = ".no-tenant.jsonl";

#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    #[serde(flatten)]
    event: &'a AuditEvent,
}

pub(super) struct Writer {
    main: AuditSink,
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    http: reqwest::Client,
    files: HashMap<PathBuf, BufWriter<File>>,
}

impl Writer {
    pub(super) fn new(
        main: AuditSink,
        shared: Arc<Shared>,
        runtime: tokio::runtime::Handle,
    ) -> Result<Writer, AuditError> {
        let http = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .connect_timeout(HTTP_CONNECT_TIMEOUT)
            .build()
            .map_err(|e| AuditError::Config(format!("HTTP client: {e}")))?;
        let mut writer = Writer {
            main,
            shared,
            runtime,
            http,
            files: HashMap::new(),
        };
        // Fail at start-up, not at the first event, on an unusable main sink.
        match writer.main.clone() {
            AuditSink::File { path } => {
                writer
                    .file(&path)
                    .map_err(|e| AuditError::Io(format!("cannot open {}: {e}", path.display())))?;
            }
            AuditSink::TenantFiles { dir } => {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| AuditError::Io(format!("cannot create {}: {e}", dir.display())))?;
            }
            AuditSink::Http { url } => {
                reqwest::Url::parse(&url)
                    .map_err(|e| AuditError::Config(format!("audit sink url {url:?}: {e}")))?;
            }
            AuditSink::None | AuditSink::Stdout => {}
        }
        Ok(writer)
    }

    pub(super) fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Event(at, event) => self.write_event(at, &event),
            Msg::Flush(done) => {
                self.flush_files();
                let _ = done.send(());
            }
        }
    }

    fn write_event(&mut self, at: DateTime<Utc>, event: &AuditEvent) {
        let line = Line {
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
            AuditSink::Http { url } => self.post(url, line),
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

    fn post(&mut self, url: &str, line: &[u8]) {
        let Ok(permit) = Arc::clone(&self.shared.http_slots).try_acquire_owned() else {
            self.shared.count_drop("too many HTTP posts in flight");
            return;
        };
        let request = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(line[..line.len().saturating_sub(1)].to_vec());
        let shared = Arc::clone(&self.shared);
        let url = url.to_owned();
        self.runtime.spawn(async move {
            let outcome = request.send().await.and_then(|r| r.error_for_status());
            if let Err(e) = outcome {
                shared.count_failure(&url, &e.to_string());
            }
            drop(permit);
        });
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
