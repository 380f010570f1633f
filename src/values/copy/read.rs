//! Client COPY data → rows of fields, as `copyfromparse.c` reads it.

use super::{CopyError, CopyFormat, CopyOptions};

/// End of line, set by the first line as PostgreSQL does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Eol {
    Nl,
    Cr,
    CrNl,
}

/// One field of the row read last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyField {
    /// SQL NULL.
    Null,
    /// A value: a range of the reader's value buffer.
    Value(usize, usize),
}

/// A record found in the buffer: its content ends at `end`, the next one
/// starts at `next`; `last`: the end-of-data marker follows it.
struct Record {
    end: usize,
    next: usize,
    last: bool,
}

/// Splits COPY data, cut into messages anywhere, into rows.
#[derive(Debug)]
pub struct RowReader {
    options: CopyOptions,
    names: Vec<String>,
    /// Input; the next record starts at `pos`.
    buf: Vec<u8>,
    pos: usize,
    /// How far the record at the start of `buf` was scanned (resumed there).
    scan: usize,
    in_quote: bool,
    last_was_escape: bool,
    /// Embedded newlines counted in the scan so far.
    scan_lines: u64,
    eol: Option<Eol>,
    line: u64,
    header_pending: bool,
    /// The end-of-data marker was read: the rest is ignored.
    ended: bool,
    max_row: usize,
    values: Vec<u8>,
    fields: Vec<CopyField>,
}

impl RowReader {
    /// A reader of rows with the fields `names`; a row longer than
    /// `max_row` bytes is an error (memory stays bounded).
    pub fn new(options: CopyOptions, names: Vec<String>, max_row: usize) -> Self {
        Self {
            header_pending: options.header,
            options,
            names,
            buf: Vec::new(),
            pos: 0,
            scan: 0,
            in_quote: false,
            last_was_escape: false,
            scan_lines: 0,
            eol: None,
            line: 0,
            ended: false,
            max_row,
            values: Vec::new(),
            fields: Vec::new(),
        }
    }

    /// The line number of the row read last (the header counts; in CSV, so
    /// do newlines inside quotes), as PostgreSQL's `COPY t, line N`.
    pub fn line(&self) -> u64 {
        self.line
    }

    /// The fields of the row read last.
    pub fn fields(&self) -> &[CopyField] {
        &self.fields
    }

    /// The bytes of a field of the row read last (`None`: NULL).
    pub fn value(&self, field: CopyField) -> Option<&[u8]> {
        match field {
            CopyField::Null => None,
            CopyField::Value(start, end) => self.values.get(start..end),
        }
    }

    /// Adds client data (ignored after the end-of-data marker).
    pub fn push(&mut self, data: &[u8]) {
        if !self.ended {
            // Rows already read are dropped once per message, not per row.
            self.buf.drain(..self.pos);
            self.pos = 0;
            self.buf.extend_from_slice(data);
        }
    }

    /// Reads the next complete row; `false` when more data is needed
    /// (`at_end`: the client's data is complete, a last row needs no end
    /// of line).
    pub fn next_row(&mut self, at_end: bool) -> Result<bool, CopyError> {
        loop {
            if self.ended {
                return Ok(false);
            }
            let found = self.find_record(at_end).inspect_err(|_| {
                // PostgreSQL counts the line before reading it.
                self.line += 1 + std::mem::take(&mut self.scan_lines);
            })?;
            let Some(record) = found else {
                if self.buf.len() - self.pos > self.max_row {
                    self.line += 1;
                    return Err(CopyError::new(
                        "54000",
                        format!(
                            "COPY row longer than the proxy's limit of {} bytes",
                            self.max_row
                        ),
                    ));
                }
                return Ok(false);
            };
            self.line += 1 + std::mem::take(&mut self.scan_lines);
            self.scan = 0;
            self.in_quote = false;
            self.last_was_escape = false;
            if record.last {
                self.ended = true;
            }
            let start = self.pos;
            self.pos += record.next;
            if (record.last && record.end == 0) || std::mem::take(&mut self.header_pending) {
                continue;
            }
            let buf = std::mem::take(&mut self.buf);
            let split = self.split(&buf[start..start + record.end]);
            self.buf = buf;
            split?;
            return Ok(true);
        }
    }

    /// Finds the record at the start of `buf`.
    fn find_record(&mut self, at_end: bool) -> Result<Option<Record>, CopyError> {
        let csv = self.options.format == CopyFormat::Csv;
        let quote = self.options.quote;
        // An escape that is the quote is only a toggle (as `escapec = '\0'`).
        let escape = (self.options.escape != quote).then_some(self.options.escape);
        let buf = &self.buf[self.pos..];
        let mut i = self.scan;
        loop {
            let Some(&c) = buf.get(i) else {
                if !at_end {
                    self.scan = i;
                    return Ok(None);
                }
                if csv && self.in_quote {
                    return Err(CopyError::format("unterminated CSV quoted field"));
                }
                if buf.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(Record {
                    end: buf.len(),
                    next: buf.len(),
                    last: false,
                }));
            };
            if csv {
                if self.in_quote && Some(c) == escape {
                    self.last_was_escape = !self.last_was_escape;
                }
                if c == quote && !self.last_was_escape {
                    self.in_quote = !self.in_quote;
                }
                if Some(c) != escape {
                    self.last_was_escape = false;
                }
                if self.in_quote {
                    let newline = match self.eol {
                        Some(Eol::Nl) | None => b'\n',
                        _ => b'\r',
                    };
                    if c == newline {
                        self.scan_lines += 1;
                    }
                    i += 1;
                    continue;
                }
            }
            if c == b'\n' || c == b'\r' {
                let next = buf.get(i + 1).copied();
                if c == b'\r' && next.is_none() && !at_end && self.eol.is_none() {
                    // `\r` or `\r\n`: the next message decides.
                    self.scan = i;
                    return Ok(None);
                }
                let found = match (c, next) {
                    (b'\r', Some(b'\n')) => Eol::CrNl,
                    (b'\r', _) => Eol::Cr,
                    _ => Eol::Nl,
                };
                let eol = *self.eol.get_or_insert(found);
                let what = if csv { "unquoted" } else { "literal" };
                let len = match (eol, c) {
                    (Eol::Nl, b'\n') | (Eol::Cr, b'\r') => 1,
                    (Eol::CrNl, b'\r') if next == Some(b'\n') => 2,
                    (Eol::CrNl, b'\r') if next.is_none() && !at_end => {
                        self.scan = i;
                        return Ok(None);
                    }
                    (_, b'\r') => {
                        return Err(CopyError::format(&format!(
                            "{what} carriage return found in data"
                        )))
                    }
                    _ => return Err(CopyError::format(&format!("{what} newline found in data"))),
                };
                return Ok(Some(Record {
                    end: i,
                    next: i + len,
                    last: false,
                }));
            }
            if c == b'\\' && (!csv || i == 0) {
                let Some(&c2) = buf.get(i + 1) else {
                    if !at_end {
                        self.scan = i;
                        return Ok(None);
                    }
                    i += 1;
                    continue;
                };
                if c2 == b'.' {
                    let after = buf.get(i + 2).copied();
                    match after {
                        None if !at_end => {
                            self.scan = i;
                            return Ok(None);
                        }
                        None | Some(b'\n') => {
                            return Ok(Some(Record {
                                end: i,
                                next: buf.len(),
                                last: true,
                            }))
                        }
                        Some(b'\r') => {
                            return Ok(Some(Record {
                                end: i,
                                next: buf.len(),
                                last: true,
                            }))
                        }
                        Some(_) if !csv => {
                            return Err(CopyError::format("end-of-copy marker corrupt"))
                        }
                        Some(_) => {}
                    }
                }
                if !csv {
                    // The escaped character is data, even an end of line.
                    i += 2;
                    continue;
                }
            }
            i += 1;
        }
    }

    /// Splits one record into fields.
    fn split(&mut self, line: &[u8]) -> Result<(), CopyError> {
        self.values.clear();
        self.fields.clear();
        match self.options.format {
            CopyFormat::Text => self.split_text(line),
            CopyFormat::Csv => self.split_csv(line)?,
        }
        let expected = self.names.len();
        if self.fields.len() > expected {
            return Err(CopyError::format("extra data after last expected column"));
        }
        if let Some(name) = self.names.get(self.fields.len()) {
            return Err(CopyError::format(&format!(
                "missing data for column \"{name}\""
            )));
        }
        if self.options.format == CopyFormat::Csv {
            for (index, field) in self.fields.iter_mut().enumerate() {
                let force_not_null = self.options.force_not_null.get(index) == Some(&true);
                let force_null = self.options.force_null.get(index) == Some(&true);
                match *field {
                    CopyField::Null if force_not_null => {
                        let start = self.values.len();
                        self.values.extend_from_slice(&self.options.null);
                        *field = CopyField::Value(start, self.values.len());
                    }
                    CopyField::Value(start, end)
                        if force_null && self.values[start..end] == self.options.null[..] =>
                    {
                        *field = CopyField::Null;
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// `CopyReadAttributesText`.
    fn split_text(&mut self, line: &[u8]) {
        let delimiter = self.options.delimiter;
        let mut p = 0;
        loop {
            let raw_start = p;
            let start = self.values.len();
            let mut found_delimiter = false;
            let mut raw_end = line.len();
            while p < line.len() {
                let mut c = line[p];
                p += 1;
                if c == delimiter {
                    found_delimiter = true;
                    raw_end = p - 1;
                    break;
                }
                if c == b'\\' {
                    let Some(&next) = line.get(p) else {
                        break;
                    };
                    p += 1;
                    c = match next {
                        b'0'..=b'7' => {
                            let mut value = u32::from(next - b'0');
                            for _ in 0..2 {
                                match line.get(p) {
                                    Some(d @ b'0'..=b'7') => {
                                        value = value * 8 + u32::from(d - b'0');
                                        p += 1;
                                    }
                                    _ => break,
                                }
                            }
                            (value & 0o377) as u8
                        }
                        b'x' => match line.get(p).and_then(|h| (*h as char).to_digit(16)) {
                            Some(high) => {
                                p += 1;
                                let mut value = high;
                                if let Some(low) =
                                    line.get(p).and_then(|h| (*h as char).to_digit(16))
                                {
                                    p += 1;
                                    value = (value << 4) + low;
                                }
                                (value & 0xff) as u8
                            }
                            None => b'x',
                        },
                        b'b' => 0x08,
                        b'f' => 0x0c,
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'v' => 0x0b,
                        other => other,
                    };
                }
                self.values.push(c);
            }
            if !found_delimiter {
                raw_end = line.len();
            }
            let field = if line[raw_start..raw_end] == self.options.null[..] {
                self.values.truncate(start);
                CopyField::Null
            } else {
                CopyField::Value(start, self.values.len())
            };
            self.fields.push(field);
            if !found_delimiter {
                return;
            }
        }
    }

    /// `CopyReadAttributesCSV`.
    fn split_csv(&mut self, line: &[u8]) -> Result<(), CopyError> {
        let CopyOptions {
            delimiter,
            quote,
            escape,
            ..
        } = self.options;
        let mut p = 0;
        loop {
            let raw_start = p;
            let start = self.values.len();
            let mut saw_quote = false;
            let mut found_delimiter = false;
            let mut raw_end = line.len();
            'field: loop {
                // Outside quotes.
                loop {
                    let Some(&c) = line.get(p) else {
                        break 'field;
                    };
                    p += 1;
                    if c == delimiter {
                        found_delimiter = true;
                        raw_end = p - 1;
                        break 'field;
                    }
                    if c == quote {
                        saw_quote = true;
                        break;
                    }
                    self.values.push(c);
                }
                // Inside quotes.
                loop {
                    let Some(&c) = line.get(p) else {
                        return Err(CopyError::format("unterminated CSV quoted field"));
                    };
                    p += 1;
                    if c == escape {
                        if let Some(&next) = line.get(p) {
                            if next == escape || next == quote {
                                self.values.push(next);
                                p += 1;
                                continue;
                            }
                        }
                    }
                    if c == quote {
                        break;
                    }
                    self.values.push(c);
                }
            }
            let field = if !saw_quote && line[raw_start..raw_end] == self.options.null[..] {
                self.values.truncate(start);
                CopyField::Null
            } else {
                CopyField::Value(start, self.values.len())
            };
            self.fields.push(field);
            if !found_delimiter {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(
        options: CopyOptions,
        names: &[&str],
        chunks: &[&[u8]],
    ) -> Result<Vec<Vec<Option<String>>>, (u64, CopyError)> {
        let mut reader = RowReader::new(
            options,
            names.iter().map(|n| n.to_string()).collect(),
            1 << 20,
        );
        let mut out = Vec::new();
        let mut collect = |reader: &mut RowReader, at_end: bool| -> Result<(), (u64, CopyError)> {
            while reader.next_row(at_end).map_err(|e| (reader.line(), e))? {
                out.push(
                    reader
                        .fields()
                        .iter()
                        .map(|f| {
                            reader
                                .value(*f)
                                .map(|v| String::from_utf8_lossy(v).into_owned())
                        })
                        .collect(),
                );
            }
            Ok(())
        };
        for chunk in chunks {
            reader.push(chunk);
            collect(&mut reader, false)?;
        }
        collect(&mut reader, true)?;
        Ok(out)
    }

    fn s(v: &str) -> Option<String> {
        Some(v.to_owned())
    }

    #[test]
    fn text_rows_are_read_with_postgresqls_escapes_across_messages() {
        let text = CopyOptions::defaults(CopyFormat::Text, 2);
        let got = rows(
            text.clone(),
            &["a", "b"],
            &[
                b"x\\ty\t\\N\n",
                b"a\\\\b\t",
                b"\\101\\x41\\q\n\\N",
                b"x\t\n",
            ],
        )
        .unwrap();
        assert_eq!(
            got,
            vec![
                vec![s("x\ty"), None],
                vec![s("a\\b"), s("AAq")],
                vec![s("Nx"), s("")],
            ]
        );
        // An escaped newline is data; `\.` ends the data; CRLF lines.
        let got = rows(
            text.clone(),
            &["a", "b"],
            &[b"1\\\n2\tz\r\n3\t4\r", b"\n\\.\r\nignored\n"],
        )
        .unwrap();
        assert_eq!(got, vec![vec![s("1\n2"), s("z")], vec![s("3"), s("4")]]);
        // A last line without an end of line is a row.
        let got = rows(text, &["a", "b"], &[b"1\t2"]).unwrap();
        assert_eq!(got, vec![vec![s("1"), s("2")]]);
    }

    #[test]
    fn text_rows_of_the_wrong_shape_fail_with_their_line() {
        let text = CopyOptions::defaults(CopyFormat::Text, 2);
        let err = rows(text.clone(), &["a", "b"], &[b"1\t2\n3\n"]).unwrap_err();
        assert_eq!(err.0, 2);
        assert_eq!(err.1.message, "missing data for column \"b\"");
        let err = rows(text.clone(), &["a", "b"], &[b"1\t2\t3\n"]).unwrap_err();
        assert_eq!(err.1.message, "extra data after last expected column");
        let err = rows(text.clone(), &["a", "b"], &[b"1\t2\n1\t2\r3\t4\n"]).unwrap_err();
        assert_eq!(err.1.message, "literal carriage return found in data");
        let err = rows(text, &["a", "b"], &[b"1\t2\n\\.x\n"]).unwrap_err();
        assert_eq!(err.1.message, "end-of-copy marker corrupt");
    }

    #[test]
    fn csv_rows_are_read_with_quotes_escapes_and_force_options() {
        let mut csv = CopyOptions::defaults(CopyFormat::Csv, 3);
        csv.header = true;
        let got = rows(
            csv.clone(),
            &["a", "b", "c"],
            &[
                b"a,b,c\n\"x,\"\"y\"\"\",,\"\"\n\"multi\nli",
                b"ne\",\\N,\"\\.\"\n",
            ],
        )
        .unwrap();
        assert_eq!(
            got,
            vec![
                vec![s("x,\"y\""), None, s("")],
                vec![s("multi\nline"), s("\\N"), s("\\.")],
            ]
        );
        csv.header = false;
        csv.escape = b'\\';
        csv.null = b"NULL".to_vec();
        csv.force_not_null = vec![true, false, false];
        csv.force_null = vec![false, true, false];
        let got = rows(
            csv.clone(),
            &["a", "b", "c"],
            &[b"NULL,\"NULL\",\"a\\\"b\"\n"],
        )
        .unwrap();
        assert_eq!(got, vec![vec![s("NULL"), None, s("a\"b")]]);
        let err = rows(csv, &["a", "b", "c"], &[b"1,2,3\n\"open\n"]).unwrap_err();
        assert_eq!(err.1.message, "unterminated CSV quoted field");
    }

    #[test]
    fn csv_lines_count_newlines_inside_quotes() {
        let csv = CopyOptions::defaults(CopyFormat::Csv, 1);
        let mut reader = RowReader::new(csv, vec!["a".into()], 1024);
        reader.push(b"\"a\nb\nc\"\nd\n");
        assert!(reader.next_row(false).unwrap());
        assert_eq!(reader.line(), 3);
        assert!(reader.next_row(false).unwrap());
        assert_eq!(reader.line(), 4);
    }

    #[test]
    fn a_row_longer_than_the_limit_is_an_error_not_a_growing_buffer() {
        let text = CopyOptions::defaults(CopyFormat::Text, 1);
        let mut reader = RowReader::new(text, vec!["a".into()], 8);
        reader.push(b"0123456");
        assert!(!reader.next_row(false).unwrap());
        reader.push(b"89abcdef");
        assert_eq!(reader.next_row(false).unwrap_err().sqlstate, "54000");
    }
}
