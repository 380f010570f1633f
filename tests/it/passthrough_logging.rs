//! Operational logs of the relay: `--log-format json` gives one JSON object per
//! line, and a connection's lines carry its client address, user and
//! database (issue 3).

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// Every string value anywhere in a JSON value.
fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

/// Every key anywhere in a JSON value.
fn keys(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| keys(x, out)),
        Value::Object(o) => o.iter().for_each(|(k, x)| {
            out.push(k.clone());
            keys(x, out)
        }),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_and_carry_client_user_and_database() {
    let pg = pg();
    let proxy = start_proxy_args(&pg, "", &["--log-format", "json"]);
    {
        let (client, _h) = connect(&proxy.url("md5_user", "md5_pw", "app")).await;
        client.simple_query("SELECT 1").await.unwrap();
        // A failing session is logged too.
        let _ = try_connect(&proxy.url("md5_user", "wrong", "app")).await;
    }
    // The session ends when the client goes; wait for its lines (hang guard 10 s).
    let mut session_line = None;
    let mut lines: Vec<Value> = Vec::new();
    for _ in 0..200 {
        let text = proxy.log_text();
        lines = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{text}"))
            })
            .collect();
        session_line = lines.iter().find(|line| {
            let mut s = Vec::new();
            strings(line, &mut s);
            s.iter().any(|v| v == "md5_user")
                && s.iter().any(|v| v == "app")
                && s.iter().any(|v| v.starts_with("127.0.0.1:"))
        });
        if session_line.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let line = session_line.unwrap_or_else(|| {
        panic!(
            "no log line carries client address, user and database:\n{}",
            proxy.log_text()
        )
    });
    let mut k = Vec::new();
    keys(line, &mut k);
    for field in ["user", "database"] {
        assert!(k.iter().any(|x| x == field), "no {field} field in {line}");
    }
    assert!(
        lines.iter().any(|l| l.to_string().contains("listening")),
        "no listening line"
    );
    // No password ever reaches the log.
    let text = proxy.log_text();
    assert!(
        !text.contains("md5_pw") && !text.contains("wrong"),
        "{text}"
    );
}
