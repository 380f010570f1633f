//! `cmk-proxy decrypt-dump`: the customer's escape hatch. Decrypts the
//! protected columns of a plain-SQL `pg_dump` with nothing but the dump, the
//! policy and each tenant's KMS key: no PostgreSQL, no running proxy.
//!
//! For every row of a policy table the row's own EDEK (its `cmk_edek` jsonb,
//! `{dek_id: base64(edek)}`) is unwrapped through the tenant's key provider
//! with the same call and context the proxy uses (`KeyProvider::unwrap` with
//! `{tenant_id, dek_id}`), and each cell is opened with its AAD (tenant,
//! `schema.table`, column), so a tampered or moved cell is an integrity
//! failure, never garbage. Rows are printed as JSON lines on stdout.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use uuid::Uuid;

use crate::config::{self, KeysConfig, Policy, SearchMode, TableMode, TablePolicy};
use crate::crypto::{self, CellAad, Dek};
use crate::kms::{DenialReason, Edek, KeyContext, KeyProvider, KmsError};

mod dump;
mod keys;

use dump::*;
use keys::*;

/// Exit code when some rows could not be decrypted (details on stderr).
pub const EXIT_ROWS_FAILED: i32 = 1;
/// Failures printed per table and tenant before only counting them.
const REPORT_LIMIT: usize = 20;

/// `--help` text of the subcommand (set on the subcommand in `cli::Command`:
/// clap takes a subcommand's long help from there, not from its `Args`).
pub const LONG_ABOUT: &str = "Decrypt the protected columns of a plain-SQL pg_dump, offline.\n\n\
    Reads DUMP (pg_dump's default plain format, whose table data are COPY blocks) and, \
    for every table of the policy, decrypts the protected columns of each row with the \
    row's own EDEK (the `edek_column`, jsonb {dek_id: base64(edek)}) unwrapped by the \
    tenant's key provider from `keys.providers`. It never connects to PostgreSQL.\n\n\
    A tenant's provider and key come from the dump's `cmk.tenants` (the registry is \
    authoritative) or else from `tenants:` in the policy. When a row's EDEK is missing \
    or does not unwrap (e.g. after `rewrap` to another key), the copy in the dump's \
    `cmk.data_keys` is used, unless --no-registry. As in the proxy, each tenant's key is \
    first checked (one `check_key` per tenant): a key that is not enabled refuses all of \
    the tenant's rows.\n\n\
    Output (stdout): one JSON object per row, in dump order:\n  \
    {\"table\":\"public.patients\",\"tenant\":\"acme\",\"row\":{\"id\":\"1\",\"ssn\":\"123-45-6789\",...}}\n\
    Values are strings in PostgreSQL's text form (protected columns: the canonical text \
    of their declared type, e.g. timestamptz in UTC), SQL NULL is null, columns keep \
    their dump order; the EDEK column and the blind-index columns (<col>_bidx of \
    `search: equality` columns) are left out.\n\n\
    Failures (stderr) name the table, the row (its number in the table's COPY block, its \
    primary key and its line in the dump), the column and the tenant: a cell that fails its integrity \
    check, an unknown tenant, a missing EDEK, a key the tenant's KMS refuses \
    (crypto-shredding). Failing rows are left out of the output; every other row is \
    still printed (so the data of the other tenants is recovered).\n\n\
    Exit status: 0 every selected row decrypted; 1 some rows failed (see stderr); \
    2 bad policy, unreadable or unsupported dump. Key material is never printed.";

/// Decrypt the protected columns of a plain-SQL pg_dump, offline.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy file (YAML): tables, their tenant/EDEK/protected columns, key providers.
    #[arg(long, short = 'c', env = "CMK_PROXY_CONFIG")]
    pub config: PathBuf,
    /// Plain-SQL dump file (`pg_dump -f dump.sql`, or `pg_restore -f - custom.dump`).
    pub dump: PathBuf,
    /// Only rows of this tenant (repeatable); rows of other tenants are skipped.
    #[arg(long)]
    pub tenant: Vec<String>,
    /// Only this policy table, as schema.table (repeatable).
    #[arg(long)]
    pub table: Vec<String>,
    /// Use only the EDEKs stored in the rows, never the dump's `cmk.data_keys`.
    #[arg(long)]
    pub no_registry: bool,
    /// Stop at the first row that fails.
    #[arg(long)]
    pub fail_fast: bool,
}

/// Why a row could not be decrypted.
#[derive(Debug, Clone)]
struct Failure {
    /// Short class for the summary: `key refused`, `integrity`, …
    kind: &'static str,
    column: Option<String>,
    detail: String,
}

/// A policy table as found in the dump: positions of its columns.
struct TableLayout<'p> {
    name: String,
    policy: &'p TablePolicy,
    columns: Vec<String>,
    tenant_at: usize,
    edek_at: Option<usize>,
    /// (position, column name) of the protected columns in the dump.
    protected: Vec<(usize, String)>,
    /// Positions left out of the output.
    hidden: BTreeSet<usize>,
    /// (name, position) of the primary-key columns, to name failing rows.
    key: Vec<(String, usize)>,
}

impl<'p> TableLayout<'p> {
    fn new(
        name: &str,
        policy: &'p TablePolicy,
        header: &CopyHeader,
        primary_key: Option<&Vec<String>>,
    ) -> Result<Self, String> {
        let at = |c: &str| header.columns.iter().position(|x| x == c);
        let key = primary_key
            .into_iter()
            .flatten()
            .filter_map(|c| at(c.as_str()).map(|i| (c.clone(), i)))
            .collect();
        let tenant_at = at(&policy.tenant_column).ok_or_else(|| {
            format!(
                "{name}: the dump has no tenant column '{}'",
                policy.tenant_column
            )
        })?;
        let edek_at = at(&policy.edek_column);
        let mut hidden = BTreeSet::new();
        hidden.extend(edek_at);
        let mut protected: Vec<(usize, String)> = Vec::new();
        for (column, cp) in &policy.columns {
            match at(column) {
                Some(i) => protected.push((i, column.clone())),
                None => eprintln!(
                    "cmk-proxy: decrypt-dump: warning: {name}: protected column '{column}' is not in the dump"
                ),
            }
            if cp.search == SearchMode::Equality {
                hidden.extend(at(&format!("{column}_bidx")));
            }
        }
        protected.sort();
        Ok(TableLayout {
            name: name.to_owned(),
            policy,
            columns: header.columns.clone(),
            tenant_at,
            edek_at,
            protected,
            hidden,
            key,
        })
    }
}

/// Counts per table for the closing summary.
#[derive(Default)]
struct Tally {
    rows_ok: u64,
    skipped: u64,
    /// (tenant, kind) → failed rows.
    failed: std::collections::BTreeMap<(String, &'static str), u64>,
}

struct Run<'p, W: Write> {
    keys: Keys<'p>,
    out: W,
    only_tenants: BTreeSet<String>,
    fail_fast: bool,
    tallies: std::collections::BTreeMap<String, Tally>,
    reported: HashMap<(String, String), usize>,
}

impl<W: Write> Run<'_, W> {
    /// Decrypts one data row; writes its JSON line or records its failure.
    /// Returns false when the run must stop (`--fail-fast`).
    async fn row(
        &mut self,
        layout: &TableLayout<'_>,
        fields: &[Option<Vec<u8>>],
        ordinal: u64,
        line_no: u64,
    ) -> std::io::Result<bool> {
        let tenant = fields.get(layout.tenant_at).and_then(text);
        if let Some(t) = &tenant {
            if !self.only_tenants.is_empty() && !self.only_tenants.contains(t) {
                self.tallies.entry(layout.name.clone()).or_default().skipped += 1;
                return Ok(true);
            }
        }
        match self.decrypt_row(layout, fields, tenant.as_deref()).await {
            Ok(line) => {
                self.out.write_all(line.as_bytes())?;
                self.out.write_all(b"\n")?;
                self.tallies.entry(layout.name.clone()).or_default().rows_ok += 1;
                Ok(true)
            }
            Err(f) => {
                let tenant = tenant.unwrap_or_else(|| "(none)".to_owned());
                let tally = self.tallies.entry(layout.name.clone()).or_default();
                *tally.failed.entry((tenant.clone(), f.kind)).or_default() += 1;
                let seen = self
                    .reported
                    .entry((layout.name.clone(), tenant.clone()))
                    .or_default();
                *seen += 1;
                if *seen <= REPORT_LIMIT {
                    let key: String = layout
                        .key
                        .iter()
                        .map(|(name, i)| {
                            let value = fields.get(*i).and_then(text);
                            format!("{name}={}, ", value.as_deref().unwrap_or("NULL"))
                        })
                        .collect();
                    let column = f
                        .column
                        .as_deref()
                        .map(|c| format!(", column {c}"))
                        .unwrap_or_default();
                    eprintln!(
                        "cmk-proxy: decrypt-dump: {} row {ordinal} ({key}dump line {line_no}){column}, tenant '{tenant}': {}: {}",
                        layout.name, f.kind, f.detail
                    );
                } else if *seen == REPORT_LIMIT + 1 {
                    eprintln!(
                        "cmk-proxy: decrypt-dump: {}: more failures for tenant '{tenant}' are only counted",
                        layout.name
                    );
                }
                Ok(!self.fail_fast)
            }
        }
    }

    async fn decrypt_row(
        &mut self,
        layout: &TableLayout<'_>,
        fields: &[Option<Vec<u8>>],
        tenant: Option<&str>,
    ) -> Result<String, Failure> {
        if fields.len() != layout.columns.len() {
            return Err(Failure {
                kind: "malformed row",
                column: None,
                detail: format!(
                    "{} fields where the COPY header names {} columns",
                    fields.len(),
                    layout.columns.len()
                ),
            });
        }
        let mut values: Vec<Option<String>> = fields.iter().map(text).collect();
        let any_cell = layout.protected.iter().any(|(i, _)| fields[*i].is_some());
        if !any_cell {
            return Ok(json_row(layout, tenant, &values));
        }
        let Some(tenant) = tenant else {
            return Err(Failure {
                kind: "no tenant",
                column: None,
                detail: format!(
                    "the tenant column '{}' is NULL",
                    layout.policy.tenant_column
                ),
            });
        };
        let edeks = row_edeks(layout, fields)?;
        for (i, column) in &layout.protected {
            let Some(raw) = &fields[*i] else { continue };
            let at_column = |kind, detail: String| Failure {
                kind,
                column: Some(column.clone()),
                detail,
            };
            let cell = std::str::from_utf8(raw)
                .ok()
                .and_then(crate::values::parse_bytea)
                .ok_or_else(|| at_column("integrity", "the cell is not a bytea value".into()))?;
            if !crypto::is_envelope(&cell) {
                if layout.policy.mode == TableMode::Migrating {
                    // Legacy plaintext, served as such in `mode: migrating`.
                    values[*i] = Some(String::from_utf8_lossy(&cell).into_owned());
                    continue;
                }
                return Err(at_column(
                    "integrity",
                    "the cell is not encrypted (no CMK header)".into(),
                ));
            }
            let dek_id = crypto::peek_dek_id(&cell)
                .map_err(|e| at_column("integrity", format!("damaged cell header: {e}")))?;
            let row_edek = edeks.get(&dek_id).map(Vec::as_slice);
            let dek = self
                .keys
                .dek(tenant, dek_id, row_edek)
                .await
                .map_err(|mut f| {
                    f.column = Some(column.clone());
                    f
                })?;
            let aad = CellAad {
                tenant_id: tenant,
                table: &layout.name,
                column,
            };
            let plaintext = crypto::open(&dek, &aad, &cell).map_err(|e| {
                at_column(
                    "integrity",
                    format!("the cell failed to decrypt with data key {dek_id}: {e}"),
                )
            })?;
            let plaintext = String::from_utf8(plaintext).map_err(|_| {
                at_column("integrity", "the decrypted value is not UTF-8 text".into())
            })?;
            values[*i] = Some(plaintext);
        }
        Ok(json_row(layout, Some(tenant), &values))
    }
}

/// The row's `{dek_id: base64(edek)}` map (empty when the column is NULL).
fn row_edeks(
    layout: &TableLayout<'_>,
    fields: &[Option<Vec<u8>>],
) -> Result<HashMap<Uuid, Vec<u8>>, Failure> {
    let bad = |detail: String| Failure {
        kind: "bad EDEK column",
        column: Some(layout.policy.edek_column.clone()),
        detail,
    };
    let Some(raw) = layout.edek_at.and_then(|i| fields[i].as_ref()) else {
        return Ok(HashMap::new());
    };
    let value: serde_json::Value =
        serde_json::from_slice(raw).map_err(|e| bad(format!("not JSON: {e}")))?;
    let object = value
        .as_object()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    let mut out = HashMap::new();
    for (id, edek) in object {
        let id = Uuid::parse_str(id).map_err(|_| bad(format!("key {id:?} is not a UUID")))?;
        let edek = edek
            .as_str()
            .and_then(|s| B64.decode(s).ok())
            .ok_or_else(|| bad(format!("the EDEK of data key {id} is not base64 text")))?;
        out.insert(id, edek);
    }
    Ok(out)
}

fn json_row(layout: &TableLayout<'_>, tenant: Option<&str>, values: &[Option<String>]) -> String {
    let quote = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
    let mut line = format!(
        "{{\"table\":{},\"tenant\":{},\"row\":{{",
        quote(&layout.name),
        tenant.map(quote).unwrap_or_else(|| "null".into())
    );
    let mut first = true;
    for (i, (name, value)) in layout.columns.iter().zip(values).enumerate() {
        if layout.hidden.contains(&i) {
            continue;
        }
        if !first {
            line.push(',');
        }
        first = false;
        line.push_str(&quote(name));
        line.push(':');
        match value {
            Some(v) => line.push_str(&quote(v)),
            None => line.push_str("null"),
        }
    }
    line.push_str("}}");
    line
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<i32> {
    let policy = match config::load_policy(&args.config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("cmk-proxy: {e}");
            return Ok(super::serve::EXIT_CONFIG);
        }
    };
    for table in &args.table {
        if !policy.tables.contains_key(table) {
            eprintln!("cmk-proxy: decrypt-dump: --table {table} is not a table of the policy");
            return Ok(super::serve::EXIT_CONFIG);
        }
    }
    let dump_error = |e: std::io::Error| {
        eprintln!(
            "cmk-proxy: decrypt-dump: cannot read {}: {e}",
            args.dump.display()
        );
        super::serve::EXIT_CONFIG
    };
    let mut magic = [0u8; 5];
    match std::fs::File::open(&args.dump).and_then(|mut f| {
        let n = f.read(&mut magic)?;
        Ok(n)
    }) {
        Ok(5) if &magic == b"PGDMP" => {
            eprintln!(
                "cmk-proxy: decrypt-dump: {} is a pg_dump archive (custom/tar format); convert it to plain SQL first: pg_restore -f plain.sql {}",
                args.dump.display(),
                args.dump.display()
            );
            return Ok(super::serve::EXIT_CONFIG);
        }
        Ok(_) => {}
        Err(e) => return Ok(dump_error(e)),
    }
    let registry = match read_registry(&args.dump) {
        Ok(r) => r,
        Err(e) => return Ok(dump_error(e)),
    };
    let tables: BTreeSet<String> = if args.table.is_empty() {
        policy.tables.keys().cloned().collect()
    } else {
        args.table.iter().cloned().collect()
    };
    let mut run = Run {
        keys: Keys {
            policy: &policy,
            registry,
            use_registry: !args.no_registry,
            providers: HashMap::new(),
            deks: HashMap::new(),
            refused: HashMap::new(),
            checked: BTreeSet::new(),
            unwrap_calls: 0,
            check_calls: 0,
        },
        out: BufWriter::new(std::io::stdout()),
        only_tenants: args.tenant.iter().cloned().collect(),
        fail_fast: args.fail_fast,
        tallies: std::collections::BTreeMap::new(),
        reported: HashMap::new(),
    };
    let file = match std::fs::File::open(&args.dump) {
        Ok(f) => f,
        Err(e) => return Ok(dump_error(e)),
    };
    let mut lines = DumpLines::new(BufReader::new(file));
    let mut seen_tables = BTreeSet::new();
    let mut stopped = false;
    // Inside a COPY block: the layout when it is a policy table.
    let mut block: Option<Option<TableLayout<'_>>> = None;
    let mut ordinal = 0u64;
    loop {
        let line = match lines.next_line() {
            Ok(Some(line)) => line.to_vec(),
            Ok(None) => break,
            Err(e) => return Ok(dump_error(e)),
        };
        let line_no = lines.line_no;
        if let Some(layout) = &block {
            if line == b"\\." {
                block = None;
                continue;
            }
            if let Some(layout) = layout {
                ordinal += 1;
                let fields = parse_copy_line(&line);
                if !run.row(layout, &fields, ordinal, line_no).await? {
                    stopped = true;
                    break;
                }
            }
            continue;
        }
        let Some(header) = std::str::from_utf8(&line).ok().and_then(parse_copy_header) else {
            continue;
        };
        let name = format!("{}.{}", header.schema, header.table);
        let layout = match policy.tables.get(&name) {
            Some(tp) if tables.contains(&name) => match TableLayout::new(
                &name,
                tp,
                &header,
                run.keys.registry.primary_keys.get(&name),
            ) {
                Ok(layout) => {
                    seen_tables.insert(name.clone());
                    run.tallies.entry(name).or_default();
                    Some(layout)
                }
                Err(e) => {
                    eprintln!("cmk-proxy: decrypt-dump: {e} (dump line {line_no})");
                    return Ok(super::serve::EXIT_CONFIG);
                }
            },
            _ => None,
        };
        ordinal = 0;
        block = Some(layout);
    }
    run.out.flush()?;
    if block.is_some() && !stopped {
        eprintln!("cmk-proxy: decrypt-dump: the dump ends inside a COPY block (truncated file?)");
        return Ok(super::serve::EXIT_CONFIG);
    }
    for table in tables.difference(&seen_tables) {
        eprintln!(
            "cmk-proxy: decrypt-dump: warning: table {table} has no COPY data in the dump (a plain pg_dump without --inserts is needed)"
        );
    }
    let mut failed_rows = 0u64;
    for (table, tally) in &run.tallies {
        let failed: u64 = tally.failed.values().sum();
        failed_rows += failed;
        eprintln!(
            "cmk-proxy: decrypt-dump: {table}: {} rows decrypted, {failed} failed, {} skipped (other tenants)",
            tally.rows_ok, tally.skipped
        );
        for ((tenant, kind), n) in &tally.failed {
            eprintln!("cmk-proxy: decrypt-dump: {table}: tenant '{tenant}': {n} rows not decrypted ({kind})");
        }
    }
    eprintln!(
        "cmk-proxy: decrypt-dump: {} KMS calls ({} key checks, {} unwraps)",
        run.keys.check_calls + run.keys.unwrap_calls,
        run.keys.check_calls,
        run.keys.unwrap_calls
    );
    if stopped {
        eprintln!("cmk-proxy: decrypt-dump: stopped at the first failure (--fail-fast)");
    }
    Ok(if failed_rows > 0 || stopped {
        EXIT_ROWS_FAILED
    } else {
        0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_headers_with_plain_and_quoted_names() {
        let h =
            parse_copy_header("COPY public.patients (id, tenant_id, ssn, cmk_edek) FROM stdin;")
                .unwrap();
        assert_eq!(h.schema, "public");
        assert_eq!(h.table, "patients");
        assert_eq!(h.columns, ["id", "tenant_id", "ssn", "cmk_edek"]);
        let h = parse_copy_header(r#"COPY "My Schema"."Pa""tients" ("Id", "a b") FROM stdin;"#)
            .unwrap();
        assert_eq!(h.schema, "My Schema");
        assert_eq!(h.table, "Pa\"tients");
        assert_eq!(h.columns, ["Id", "a b"]);
        assert!(parse_copy_header("COPY public.t (a) TO stdout;").is_none());
        assert!(parse_copy_header("-- COPY public.t (a) FROM stdin;").is_none());
    }

    #[test]
    fn copy_text_fields_are_unescaped() {
        let fields = parse_copy_line(b"1\t\\N\ta\\tb\\\\c\\nd\t\\\\x434d\t\\101\\x42\\z");
        assert_eq!(
            fields,
            vec![
                Some(b"1".to_vec()),
                None,
                Some(b"a\tb\\c\nd".to_vec()),
                Some(b"\\x434d".to_vec()),
                Some(b"ABz".to_vec()),
            ]
        );
        assert_eq!(parse_copy_line(b""), vec![Some(Vec::new())]);
    }
}
