//! The session's SQL-level prepared statements (`PREPARE p AS …`). The
//! proxy lets one through only when it touches no protected data, but
//! PostgreSQL plans it again at `EXECUTE p` after the schema changed: a
//! view it writes may show a protected table by then. So the proxy keeps
//! each name's text and reads it again, against the current catalog and
//! the session's schema flux, at every `EXECUTE` of it.

use std::collections::HashMap;

use super::encryption::Encryption;
use super::own_statements::StatementWords;
use super::state::SessionState;
use crate::rewrite::{self, Rejection, SqlPrepareOp, StatementPlan};

/// Name → the `PREPARE` statement's text, as the session defined them.
#[derive(Debug, Default)]
pub(crate) struct SqlPrepared {
    statements: HashMap<String, String>,
}

impl SqlPrepared {
    /// The refusal of `sql` when it executes a statement prepared by name
    /// that would now run on protected data. Costs nothing unless the
    /// session prepared statements and `sql` has the word `execute`.
    pub(crate) fn refusal(
        &self,
        sql: &str,
        words: StatementWords,
        encryption: &Encryption,
        state: &SessionState,
    ) -> Option<Rejection> {
        if !words.executes || self.statements.is_empty() {
            return None;
        }
        // Statements of the same query string may prepare or deallocate
        // the name first.
        let mut here: HashMap<String, Option<String>> = HashMap::new();
        for op in rewrite::sql_prepare_ops(sql) {
            match op {
                SqlPrepareOp::Prepare { name, text } => {
                    here.insert(name, Some(text));
                }
                SqlPrepareOp::Deallocate(Some(name)) => {
                    here.insert(name, None);
                }
                SqlPrepareOp::Deallocate(None) => {
                    here = self.statements.keys().map(|k| (k.clone(), None)).collect();
                }
                SqlPrepareOp::Execute(name) => {
                    let text = match here.get(&name) {
                        Some(text) => text.as_ref(),
                        None => self.statements.get(&name),
                    };
                    if let Some(text) = text {
                        if let Some(rejection) = replanned_refusal(&name, text, encryption, state) {
                            return Some(rejection);
                        }
                    }
                }
            }
        }
        None
    }

    /// Follows what `sql` (sent to the server) does to the session's
    /// prepared statements.
    pub(crate) fn follow(&mut self, sql: &str, words: StatementWords) {
        if !(words.prepares || words.drops) {
            return;
        }
        for op in rewrite::sql_prepare_ops(sql) {
            match op {
                SqlPrepareOp::Prepare { name, text } => {
                    self.statements.insert(name, text);
                }
                SqlPrepareOp::Deallocate(Some(name)) => {
                    self.statements.remove(&name);
                }
                SqlPrepareOp::Deallocate(None) => self.statements.clear(),
                SqlPrepareOp::Execute(_) => {}
            }
        }
    }
}

/// The refusal of `EXECUTE name` when `prepare` (its `PREPARE` text), read
/// again now, touches protected data or a name in flux.
fn replanned_refusal(
    name: &str,
    prepare: &str,
    encryption: &Encryption,
    state: &SessionState,
) -> Option<Rejection> {
    if let Err(rejection) = super::statements::refuse_in_flux(prepare, encryption, state) {
        return Some(rejection);
    }
    let catalog = encryption.catalog();
    let facts = catalog.schema_facts();
    let full = encryption.policy();
    let policy = catalog.analysis_policy(&full);
    let changed = |reason: &str| Rejection {
        sqlstate: rewrite::KM003,
        table: None,
        column: None,
        message: format!(
            "cmk-proxy: {reason} (the schema changed since statement \"{name}\" was prepared: \
             prepared statements on protected data are supported through the protocol's \
             Parse, not SQL PREPARE)"
        ),
    };
    match rewrite::analyze_in(policy, facts, prepare, 0) {
        Ok(analysis)
            if analysis
                .statements
                .iter()
                .all(|plan| matches!(plan, StatementPlan::Untouched)) =>
        {
            None
        }
        Ok(_) => Some(changed("it now touches protected data")),
        Err(rejection) => {
            let reason = rejection.message.trim_start_matches("cmk-proxy: ");
            Some(changed(reason))
        }
    }
}
