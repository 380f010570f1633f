//! Differential fuzzing of the proxy's reading of SQL against PostgreSQL's
//! own parser (libpg_query, used here directly as the oracle): generated
//! SQL mixes every quoting form, comment form, escape and nesting around
//! statements on a protected table. Whenever the analysis lets a query
//! string through, it must have read as many statements as PostgreSQL, and
//! every statement PostgreSQL reads as touching the protected table (or
//! calling `set_config`) must be planned as such, never as untouched; every
//! INSERT or UPDATE of it must be a planned write. A bounded run is a unit
//! test; `CMK_FUZZ_CASES` runs longer.

use pg_query::{NodeEnum, NodeRef};
use proptest::prelude::*;

use super::{analyze, StatementPlan};
use crate::config::{parse_policy, Policy};

fn policy() -> Policy {
    parse_policy(
        "tables:\n  public.patients:\n    tenant_column: tenant_id\n    columns:\n      ssn: {type: text}\n      notes: {type: text}\n",
        "fuzz",
    )
    .unwrap()
}

/// Fragments whose meaning depends on exact lexing, and statements that
/// touch the protected table.
const FRAGMENTS: &[&str] = &[
    "$§$",
    "$é$",
    "$$",
    "$a$",
    "'",
    "''",
    "E'",
    "e'",
    "\\'",
    "\\\\",
    "/*",
    "*/",
    "--",
    "\n",
    "\r",
    "U&'",
    "U&\"",
    "\"",
    "\\0061",
    "UESCAPE '!'",
    "p\\0061tients",
    "!0061",
    ";",
    " ",
    ",",
    "(",
    ")",
    "SELECT ",
    "SELECT 1",
    " AS a",
    "WITH c AS (",
    ") SELECT 1",
    "patients",
    "ssn",
    "1",
    "0x1F",
    "1_0",
    "'x'",
    "$1",
    "INSERT INTO patients (tenant_id, ssn) VALUES ('acme', 'p')",
    "INSERT INTO patients (tenant_id, ssn) VALUES ($$acme$$, $$p$$) RETURNING id",
    "UPDATE patients SET ssn = 'p' WHERE tenant_id = 'acme'",
    "SELECT encode(ssn, 'hex') FROM patients",
    "SELECT ssn FROM patients",
    "SELECT set_config('cmk.tenant_id', 'x', false)",
    "DELETE FROM patients",
];

/// What PostgreSQL reads in statement `stmt`: does it name the table (or
/// call set_config), and is it an INSERT or UPDATE of it?
fn oracle(stmt: &NodeEnum) -> (bool, bool) {
    let names = stmt.nodes().iter().any(|(node, _, _, _)| match node {
        NodeRef::RangeVar(v) => v.relname == "patients",
        NodeRef::FuncCall(f) => f.funcname.last().is_some_and(
            |n| matches!(&n.node, Some(NodeEnum::String(s)) if s.sval == "set_config"),
        ),
        _ => false,
    });
    let writes = match stmt {
        NodeEnum::InsertStmt(i) => i.relation.as_ref().is_some_and(|r| r.relname == "patients"),
        NodeEnum::UpdateStmt(u) => u.relation.as_ref().is_some_and(|r| r.relname == "patients"),
        _ => false,
    };
    (names, writes)
}

/// Checks the analysis of `sql` against PostgreSQL's reading; `Err` says
/// how they disagree.
fn agrees_with_postgresql(policy: &Policy, sql: &str) -> Result<(), String> {
    let Ok(analysis) = analyze(policy, sql, 0) else {
        return Ok(()); // refused: fail closed
    };
    let Ok(parsed) = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) else {
        return Ok(()); // PostgreSQL refuses it itself
    };
    let statements = &parsed.protobuf.stmts;
    if statements.len() != analysis.statements.len() {
        return Err(format!(
            "{} statements to PostgreSQL, {} to the proxy",
            statements.len(),
            analysis.statements.len()
        ));
    }
    for (raw, plan) in statements.iter().zip(&analysis.statements) {
        let Some(node) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) else {
            continue;
        };
        let (names, writes) = oracle(node);
        if names && matches!(plan, StatementPlan::Untouched) {
            return Err("PostgreSQL reads the protected table, the proxy nothing".into());
        }
        if writes && !matches!(plan, StatementPlan::Write(_)) {
            return Err(format!("PostgreSQL reads a write, the proxy {plan:?}"));
        }
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("CMK_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3000)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]
    #[test]
    fn the_proxy_reads_what_postgresql_reads(
        pieces in proptest::collection::vec(proptest::sample::select(FRAGMENTS), 1..14)
    ) {
        let sql: String = pieces.concat();
        let policy = policy();
        if let Err(why) = agrees_with_postgresql(&policy, &sql) {
            prop_assert!(false, "{why}: {sql:?}");
        }
    }
}

/// Openings and closings that one lexer may read as a string or comment
/// and another not.
const HIDERS: &[(&str, &str)] = &[
    ("$§$", "$§$"),
    ("$é$", "$é$"),
    ("$日$", "$日$"),
    ("$$", "$$"),
    ("/* /* */", "*/"),
    ("/*", "*/"),
    ("E'\\'", "'"),
    ("E'\\\\'", "'"),
    ("U&'\\'", "'"),
    ("'", "'"),
    ("--", "\n"),
    ("\"", "\""),
];
const JOINERS: &[&str] = &[";", " ; ", "), c AS (", ", ", " "];
const STATEMENTS: &[&str] = &[
    "INSERT INTO patients (tenant_id, ssn) VALUES ($$acme$$, $$p$$) RETURNING id",
    "UPDATE patients SET ssn = $$p$$ WHERE true RETURNING id",
    "SELECT encode(ssn, 'hex') FROM patients",
    "SELECT set_config('cmk.tenant_id', 'x', false)",
];
const TAILS: &[&str] = &[
    "",
    " --') SELECT 1",
    ") SELECT id FROM c --') SELECT 1",
    " --'",
    " */",
    "'",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]
    #[test]
    fn a_statement_hidden_between_quotes_or_comments_is_seen(
        with in any::<bool>(),
        (open, close) in proptest::sample::select(HIDERS),
        inner in proptest::collection::vec(proptest::sample::select(FRAGMENTS), 0..3),
        glue in proptest::sample::select(&[", '", ", ", "'", " '", "), '"][..]),
        joiner in proptest::sample::select(JOINERS),
        statement in proptest::sample::select(STATEMENTS),
        tail in proptest::sample::select(TAILS),
    ) {
        let head = if with { "WITH w AS (SELECT " } else { "SELECT " };
        let sql = format!(
            "{head}{open}{}{glue}{close} AS a{joiner}{statement}{tail}",
            inner.concat()
        );
        let policy = policy();
        if let Err(why) = agrees_with_postgresql(&policy, &sql) {
            prop_assert!(false, "{why}: {sql:?}");
        }
    }
}

#[test]
fn the_issue_payloads_agree() {
    let policy = policy();
    for sql in [
        "WITH w AS (SELECT $§$, '$§$ AS a), c AS (INSERT INTO patients (tenant_id, ssn, notes) \
         VALUES ($$acme$$, $$PLAINTEXT$$, $$PLAINTEXT$$) RETURNING id) SELECT id FROM c --') SELECT 1",
        "SELECT 1 /* /* */ ; INSERT INTO patients (tenant_id, ssn) VALUES ('acme', 'p') -- */",
        "INSERT INTO U&\"p\\0061tients\" (tenant_id, ssn) VALUES ('acme', 'p')",
    ] {
        assert_eq!(agrees_with_postgresql(&policy, sql), Ok(()), "{sql}");
    }
}
