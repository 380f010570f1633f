//! The Parse messages a session sent last, with their plans: drivers that
//! use the unnamed statement (pgbench `-M extended`, psycopg, node-postgres
//! without a name) send the same Parse again for every execution, and a
//! repeat is recognised by its bytes alone, without reading its SQL again
//! (UTF-8 check, keyword scan, plan-cache hash of the whole text). A
//! repeat of an unnamed Parse on protected tables also runs as one of the
//! proxy's own named statements (see `own_statements`), so PostgreSQL does
//! not parse and plan it again either.
//!
//! Only Parses whose planning depends on nothing but their bytes and the
//! shared plan cache are kept: no keyword that drops or names statements or
//! runs `EXECUTE`, no DDL, and standard-conforming strings. An entry is
//! valid while the plan cache it came from is (same epoch).

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::BytesMut;

use super::pending::ServerSql;

/// Parses remembered per session (the newest first).
const CAPACITY: usize = 16;

/// A Parse seen before and what the proxy made of it.
pub(crate) struct RecentParse<P> {
    /// The message body as the client sent it (name, SQL, types).
    body: Box<[u8]>,
    /// The plan-cache epoch the plan belongs to.
    epoch: u64,
    /// The statement name.
    pub name: String,
    /// The parameter types the client declared.
    pub declared: Vec<u32>,
    /// The shared plan.
    pub plan: Arc<P>,
    /// The Parse sent instead of the client's (`None`: the original).
    pub replacement: Option<BytesMut>,
    /// What the server runs, when a repeat of this unnamed Parse runs as
    /// the proxy's own statement.
    pub server: Option<Arc<ServerSql>>,
}

/// The last [`CAPACITY`] Parses of a session worth remembering, with
/// their plans `P`.
pub(crate) struct RecentParses<P> {
    entries: VecDeque<RecentParse<P>>,
}

impl<P> Default for RecentParses<P> {
    fn default() -> Self {
        Self {
            entries: VecDeque::with_capacity(CAPACITY),
        }
    }
}

impl<P> RecentParses<P> {
    /// The entry of a Parse with exactly this `body`, planned in `epoch`.
    pub(crate) fn find(&mut self, body: &[u8], epoch: u64) -> Option<&RecentParse<P>> {
        let index = self.entries.iter().position(|e| *e.body == *body)?;
        if self.entries[index].epoch != epoch {
            self.entries.remove(index);
            return None;
        }
        if index != 0 {
            let entry = self.entries.remove(index)?;
            self.entries.push_front(entry);
        }
        self.entries.front()
    }

    /// Remembers the Parse with this `body`, planned in `epoch` (see the
    /// module doc for which): what the proxy made of it is `entry`.
    pub(crate) fn remember(&mut self, body: &[u8], epoch: u64, entry: Remembered<P>) {
        if self.entries.len() >= CAPACITY {
            self.entries.pop_back();
        }
        let Remembered {
            name,
            declared,
            plan,
            replacement,
            server,
        } = entry;
        self.entries.push_front(RecentParse {
            body: body.into(),
            epoch,
            name: name.to_owned(),
            declared: declared.to_vec(),
            plan,
            replacement: replacement.cloned(),
            server,
        });
    }
}

/// What the proxy made of a Parse, to remember (see [`RecentParse`]).
pub(crate) struct Remembered<'a, P> {
    /// The statement name.
    pub name: &'a str,
    /// The parameter types the client declared.
    pub declared: &'a [u32],
    /// The shared plan.
    pub plan: Arc<P>,
    /// The Parse sent instead of the client's (`None`: the original).
    pub replacement: Option<&'a BytesMut>,
    /// What the server runs, when a repeat runs as the proxy's statement.
    pub server: Option<Arc<ServerSql>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remember(recent: &mut RecentParses<u32>, body: &[u8], epoch: u64, plan: u32) {
        let entry = Remembered {
            name: "",
            declared: &[],
            plan: Arc::new(plan),
            replacement: None,
            server: None,
        };
        recent.remember(body, epoch, entry);
    }

    #[test]
    fn a_parse_is_found_by_its_exact_bytes_in_its_epoch_only() {
        let mut recent = RecentParses::default();
        remember(&mut recent, b"\0SELECT 1\0\0\0", 3, 1);
        let found =
            |r: &mut RecentParses<u32>, body: &[u8], epoch| r.find(body, epoch).map(|e| *e.plan);
        assert_eq!(found(&mut recent, b"\0SELECT 1\0\0\0", 3), Some(1));
        assert_eq!(found(&mut recent, b"\0SELECT 2\0\0\0", 3), None);
        assert_eq!(found(&mut recent, b"\0SELECT 1 \0\0\0", 3), None);
        // A newer epoch: the entry is stale and gone.
        assert_eq!(found(&mut recent, b"\0SELECT 1\0\0\0", 4), None);
        assert_eq!(found(&mut recent, b"\0SELECT 1\0\0\0", 3), None);
    }

    #[test]
    fn the_least_recently_used_parse_is_forgotten_first() {
        let mut recent = RecentParses::default();
        for i in 0..CAPACITY as u32 {
            remember(&mut recent, format!("q{i}").as_bytes(), 0, i);
        }
        // Using q0 makes q1 the oldest.
        assert!(recent.find(b"q0", 0).is_some());
        remember(&mut recent, b"new", 0, 99);
        assert!(recent.find(b"q1", 0).is_none());
        assert!(recent.find(b"q0", 0).is_some());
        assert!(recent.find(b"new", 0).is_some());
        assert_eq!(recent.entries.len(), CAPACITY);
    }
}
