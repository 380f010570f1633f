//! Protocol version negotiation (issue 17): a client asking for protocol
//! 3.2 (libpq 18 with `max_protocol_version=latest`) or sending `_pq_.`
//! options is answered with NegotiateProtocolVersion, as PostgreSQL
//! answers, and its session then works at 3.0.

use crate::common;

use common::raw::{self, BackendMessage};
use common::*;

/// The version and option names of the NegotiateProtocolVersion answer.
fn negotiation(messages: &[BackendMessage]) -> Option<(u32, Vec<String>)> {
    let v = messages.iter().find(|m| m.tag == b'v')?;
    let minor = u32::from_be_bytes(v.body[..4].try_into().ok()?);
    let names = v.body[8..]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    Some((minor, names))
}

#[test]
fn protocol_3_2_startup_is_negotiated_down_as_postgresql_does() {
    let pg = pg();
    let proxy = start_proxy(&pg, "");
    // What PostgreSQL itself answers, then the same through the proxy.
    let mut answers = Vec::new();
    for port in [pg.port(), proxy.port()] {
        let mut s = raw::connect(port);
        raw::send(
            &mut s,
            &raw::startup_with(
                0x0003_0002,
                &[
                    ("user", "postgres"),
                    ("database", "app"),
                    ("_pq_.cmk_test", "on"),
                ],
            ),
        );
        let messages = raw::read_until_ready(&mut s);
        assert_eq!(
            messages.last().map(|m| m.tag),
            Some(b'Z'),
            "port {port}: {messages:?}"
        );
        assert_eq!(messages.first().map(|m| m.tag), Some(b'v'), "{messages:?}");
        answers.push(negotiation(&messages));
        raw::send(&mut s, &raw::query("SELECT 40 + 2"));
        let rows = raw::read_until_ready(&mut s);
        let data = rows.iter().find(|m| m.tag == b'D').expect("a row");
        assert!(data.body.ends_with(b"42"), "{rows:?}");
    }
    // PostgreSQL 15 sends its whole newest version, 3.0.
    assert_eq!(
        answers[0],
        Some((0x0003_0000, vec!["_pq_.cmk_test".to_owned()]))
    );
    assert_eq!(answers[1], answers[0], "proxy answers as PostgreSQL");
}
