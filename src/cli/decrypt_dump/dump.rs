//! Reading a plain-SQL `pg_dump`: its COPY blocks, their fields as COPY
//! text escapes them, and the key registry's rows in it.

use super::*;

/// A COPY block header: `COPY schema.table (col, ...) FROM stdin;`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CopyHeader {
    pub(super) schema: String,
    pub(super) table: String,
    pub(super) columns: Vec<String>,
}

/// Parses a COPY header line of a plain pg_dump; `None` if it is not one.
pub(super) fn parse_copy_header(line: &str) -> Option<CopyHeader> {
    let rest = line.strip_prefix("COPY ")?.trim_end();
    let rest = rest.strip_suffix(" FROM stdin;")?;
    let (schema, rest) = parse_ident(rest)?;
    let rest = rest.strip_prefix('.')?;
    let (table, rest) = parse_ident(rest)?;
    let mut rest = rest.trim_start().strip_prefix('(')?;
    let mut columns = Vec::new();
    loop {
        let (column, tail) = parse_ident(rest.trim_start())?;
        columns.push(column);
        let tail = tail.trim_start();
        if let Some(t) = tail.strip_prefix(',') {
            rest = t;
        } else {
            tail.strip_prefix(')')?.trim().is_empty().then_some(())?;
            break;
        }
    }
    Some(CopyHeader {
        schema,
        table,
        columns,
    })
}

/// One identifier as pg_dump prints it: bare, or double-quoted with `""`.
pub(super) fn parse_ident(s: &str) -> Option<(String, &str)> {
    if let Some(body) = s.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = body.char_indices();
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if body[i + 1..].starts_with('"') {
                    out.push('"');
                    chars.next();
                } else {
                    return Some((out, &body[i + 1..]));
                }
            } else {
                out.push(c);
            }
        }
        None
    } else {
        let end = s
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
            .unwrap_or(s.len());
        (end > 0).then(|| (s[..end].to_owned(), &s[end..]))
    }
}

/// Splits one line of COPY text data into fields (`None` = SQL NULL) and
/// undoes COPY's backslash escapes.
pub(super) fn parse_copy_line(line: &[u8]) -> Vec<Option<Vec<u8>>> {
    line.split(|&b| b == b'\t')
        .map(|field| (field != b"\\N").then(|| unescape_copy(field)))
        .collect()
}

pub(super) fn unescape_copy(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        if b != b'\\' || i + 1 == field.len() {
            out.push(b);
            i += 1;
            continue;
        }
        let next = field[i + 1];
        i += 2;
        match next {
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'0'..=b'7' => {
                let mut value = u32::from(next - b'0');
                let mut taken = 0;
                while taken < 2 && i < field.len() && (b'0'..=b'7').contains(&field[i]) {
                    value = value * 8 + u32::from(field[i] - b'0');
                    i += 1;
                    taken += 1;
                }
                out.push((value & 0xff) as u8);
            }
            b'x' if i < field.len() && field[i].is_ascii_hexdigit() => {
                let mut value = 0u32;
                let mut taken = 0;
                while taken < 2 && i < field.len() && field[i].is_ascii_hexdigit() {
                    value = value * 16 + char::from(field[i]).to_digit(16).unwrap_or(0);
                    i += 1;
                    taken += 1;
                }
                out.push((value & 0xff) as u8);
            }
            other => out.push(other),
        }
    }
    out
}

/// Reads a dump line by line (bytes, without the trailing newline).
pub(super) struct DumpLines<R> {
    pub(super) reader: R,
    pub(super) line_no: u64,
    pub(super) buf: Vec<u8>,
}

impl<R: BufRead> DumpLines<R> {
    pub(super) fn new(reader: R) -> Self {
        DumpLines {
            reader,
            line_no: 0,
            buf: Vec::new(),
        }
    }

    /// The next line, or `None` at the end of the file.
    pub(super) fn next_line(&mut self) -> std::io::Result<Option<&[u8]>> {
        self.buf.clear();
        if self.reader.read_until(b'\n', &mut self.buf)? == 0 {
            return Ok(None);
        }
        self.line_no += 1;
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
        }
        Ok(Some(&self.buf))
    }
}

/// What the first pass learns: the dump's `cmk` registry and primary keys.
#[derive(Default)]
pub(super) struct DumpRegistry {
    /// tenant → (provider, key_ref).
    pub(super) tenants: HashMap<String, (String, String)>,
    /// dek_id → (tenant, key_ref, edek).
    pub(super) data_keys: HashMap<Uuid, (String, String, Vec<u8>)>,
    /// `schema.table` → primary-key columns (to name failing rows).
    pub(super) primary_keys: HashMap<String, Vec<String>>,
}

/// `ADD CONSTRAINT name PRIMARY KEY (a, b);` (the line after `ALTER TABLE ONLY t`).
pub(super) fn parse_primary_key(line: &str) -> Option<Vec<String>> {
    let rest = line.trim_start().strip_prefix("ADD CONSTRAINT ")?;
    let (_, rest) = parse_ident(rest)?;
    let mut rest = rest.strip_prefix(" PRIMARY KEY (")?;
    let mut columns = Vec::new();
    loop {
        let (column, tail) = parse_ident(rest.trim_start())?;
        columns.push(column);
        match tail.strip_prefix(',') {
            Some(t) => rest = t,
            None => {
                tail.starts_with(')').then_some(())?;
                return Some(columns);
            }
        }
    }
}

pub(super) fn parse_qualified(s: &str) -> Option<String> {
    let (schema, rest) = parse_ident(s)?;
    let (table, rest) = parse_ident(rest.strip_prefix('.')?)?;
    rest.trim().is_empty().then(|| format!("{schema}.{table}"))
}

pub(super) fn text(field: &Option<Vec<u8>>) -> Option<String> {
    field
        .as_ref()
        .map(|b| String::from_utf8_lossy(b).into_owned())
}

pub(super) fn read_registry(path: &Path) -> std::io::Result<DumpRegistry> {
    let mut registry = DumpRegistry::default();
    let mut lines = DumpLines::new(BufReader::new(std::fs::File::open(path)?));
    // Which registry table the current COPY block fills, and its column positions.
    let mut block: Option<(bool, HashMap<String, usize>)> = None;
    let mut altered: Option<String> = None;
    while let Some(line) = lines.next_line()? {
        if let Some((is_tenants, cols)) = &block {
            if line == b"\\." {
                block = None;
                continue;
            }
            let fields = parse_copy_line(line);
            let get = |name: &str| cols.get(name).and_then(|&i| fields.get(i)).and_then(text);
            if *is_tenants {
                if let (Some(t), Some(p), Some(k)) =
                    (get("tenant_id"), get("provider"), get("key_ref"))
                {
                    registry.tenants.insert(t, (p, k));
                }
            } else if let (Some(id), Some(t), Some(edek)) =
                (get("dek_id"), get("tenant_id"), get("edek"))
            {
                if let (Ok(id), Some(edek)) =
                    (Uuid::parse_str(&id), crate::values::parse_bytea(&edek))
                {
                    registry
                        .data_keys
                        .insert(id, (t, get("key_ref").unwrap_or_default(), edek));
                }
            }
            continue;
        }
        let Ok(line) = std::str::from_utf8(line) else {
            continue;
        };
        if let Some(table) = altered.take() {
            if let Some(pk) = parse_primary_key(line) {
                registry.primary_keys.insert(table, pk);
            }
        }
        if let Some(rest) = line.strip_prefix("ALTER TABLE ONLY ") {
            altered = parse_qualified(rest);
            continue;
        }
        let Some(header) = parse_copy_header(line) else {
            continue;
        };
        if header.schema == "cmk" && (header.table == "tenants" || header.table == "data_keys") {
            let cols = header
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| (c.clone(), i))
                .collect();
            block = Some((header.table == "tenants", cols));
        } else {
            block = Some((false, HashMap::new()));
        }
    }
    Ok(registry)
}
