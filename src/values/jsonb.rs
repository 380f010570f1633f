//! jsonb's text form exactly as PostgreSQL 15 prints it: numbers kept as
//! `numeric` keeps them (`0.1000`, `1E2` → `100`, any length), object keys
//! ordered shortest first then bytewise with the last duplicate kept, one
//! space after `:` and `,`, strings escaped as `escape_json` does.
//!
//! Its own small reader rather than `serde_json::Value`, which turns numbers
//! into `f64`. Parsing and printing use explicit stacks, not recursion, so
//! no nesting depth a client sends can overflow a thread's stack.

use std::fmt::Write as _;

use super::canonical::canonical_numeric;

/// A value of the document; containers refer to their members by index
/// into one flat list (dropping it never recurses).
enum Node {
    /// A number, string or literal already in its output form.
    Scalar(String),
    Array(Vec<usize>),
    /// Members as (decoded key, value); sorted and de-duplicated on close.
    Object(Vec<(String, usize)>),
}

/// Why a jsonb input is refused (never the value itself).
pub(super) type Refusal = &'static str;

/// Largest canonical text produced: numbers such as `1e131071` print as
/// 131,072 digits, so a small input could otherwise ask for gigabytes.
/// PostgreSQL's own jsonb values stop at 256 MB as well.
const MAX_OUTPUT: usize = 256 << 20;

/// Validates `text` as PostgreSQL's jsonb input does and returns its output.
pub(super) fn canonical_jsonb(text: &str) -> Result<String, Refusal> {
    let nodes = Reader::new(text).read()?;
    write(&nodes)
}

struct Reader<'a> {
    bytes: &'a [u8],
    text: &'a str,
    pos: usize,
    nodes: Vec<Node>,
    /// Containers still open, innermost last.
    open: Vec<usize>,
    /// Keys waiting for their value, one per open object that has one.
    keys: Vec<String>,
    /// Bytes of output the scalars will take, checked against `MAX_OUTPUT`.
    size: usize,
}

/// What `Reader::value` left behind.
#[derive(PartialEq, Eq)]
enum Read {
    /// A whole value.
    Done,
    /// A non-empty container, waiting for its first member's value.
    Opened,
}

const SYNTAX: Refusal = "invalid input syntax for type json";

impl<'a> Reader<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            bytes: text.as_bytes(),
            text,
            pos: 0,
            nodes: Vec::new(),
            open: Vec::new(),
            keys: Vec::new(),
            size: 0,
        }
    }

    fn read(mut self) -> Result<Vec<Node>, Refusal> {
        loop {
            if self.value()? == Read::Opened {
                // Its first member is the next value.
                continue;
            }
            // After a value: close containers, or go on to the next member.
            loop {
                self.skip_space();
                let Some(&container) = self.open.last() else {
                    return if self.pos == self.bytes.len() {
                        Ok(self.nodes)
                    } else {
                        Err(SYNTAX)
                    };
                };
                let is_array = matches!(self.nodes[container], Node::Array(_));
                match (is_array, self.next_byte()) {
                    (_, Some(b',')) => {
                        if !is_array {
                            self.key()?;
                        }
                        break;
                    }
                    (true, Some(b']')) | (false, Some(b'}')) => self.close(),
                    _ => return Err(SYNTAX),
                }
            }
        }
    }

    /// Reads one value; a container is left open (with its first member's
    /// key read), or closed at once when empty.
    fn value(&mut self) -> Result<Read, Refusal> {
        self.skip_space();
        let node = match self.bytes.get(self.pos) {
            Some(b'[') | Some(b'{') => {
                let is_array = self.bytes[self.pos] == b'[';
                self.pos += 1;
                let index = self.attach(if is_array {
                    Node::Array(Vec::new())
                } else {
                    Node::Object(Vec::new())
                });
                self.open.push(index);
                self.skip_space();
                let end = if is_array { b']' } else { b'}' };
                if self.bytes.get(self.pos) == Some(&end) {
                    self.pos += 1;
                    self.close();
                    return Ok(Read::Done);
                }
                if !is_array {
                    self.key()?;
                }
                return Ok(Read::Opened);
            }
            Some(b'"') => {
                let s = self.string()?;
                let mut out = String::with_capacity(s.len() + 2);
                escape(&s, &mut out);
                out
            }
            Some(b'-' | b'0'..=b'9') => self.number()?,
            Some(b't' | b'f' | b'n') => self.keyword()?,
            _ => return Err(SYNTAX),
        };
        self.size = self.size.saturating_add(node.len());
        if self.size > MAX_OUTPUT {
            return Err("jsonb value too large");
        }
        self.attach(Node::Scalar(node));
        Ok(Read::Done)
    }

    /// An object member's key and its `:`.
    fn key(&mut self) -> Result<(), Refusal> {
        self.skip_space();
        let key = self.string()?;
        self.keys.push(key);
        self.skip_space();
        (self.next_byte() == Some(b':')).then_some(()).ok_or(SYNTAX)
    }

    /// Adds a node and makes it the pending member of the open container.
    fn attach(&mut self, node: Node) -> usize {
        let index = self.nodes.len();
        self.nodes.push(node);
        if let Some(&parent) = self.open.last() {
            match &mut self.nodes[parent] {
                Node::Array(items) => items.push(index),
                Node::Object(members) => {
                    if let Some(key) = self.keys.pop() {
                        members.push((key, index));
                    }
                }
                Node::Scalar(_) => {}
            }
        }
        index
    }

    /// Closes the innermost container; an object's keys get jsonb's order:
    /// shorter first, then bytewise, the last of equal keys kept.
    fn close(&mut self) {
        if let Some(index) = self.open.pop() {
            if let Node::Object(members) = &mut self.nodes[index] {
                members.sort_by(|(a, _), (b, _)| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
                let mut kept: Vec<(String, usize)> = Vec::with_capacity(members.len());
                for member in members.drain(..) {
                    match kept.last_mut() {
                        Some(last) if last.0 == member.0 => *last = member,
                        _ => kept.push(member),
                    }
                }
                *members = kept;
            }
        }
    }

    fn next_byte(&mut self) -> Option<u8> {
        let b = self.bytes.get(self.pos).copied();
        self.pos += usize::from(b.is_some());
        b
    }

    /// JSON whitespace only, as PostgreSQL's lexer: space, tab, CR, LF.
    fn skip_space(&mut self) {
        while matches!(self.bytes.get(self.pos), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    /// A token must not run on into letters, digits, `_` or non-ASCII
    /// (`truex`, `1a`, `01` are single bad tokens to PostgreSQL).
    fn token_ends(&self) -> Result<(), Refusal> {
        match self.bytes.get(self.pos) {
            Some(b) if b.is_ascii_alphanumeric() || *b == b'_' || *b >= 0x80 => Err(SYNTAX),
            _ => Ok(()),
        }
    }

    fn keyword(&mut self) -> Result<String, Refusal> {
        for word in ["true", "false", "null"] {
            if self.bytes[self.pos..].starts_with(word.as_bytes()) {
                self.pos += word.len();
                self.token_ends()?;
                return Ok(word.to_owned());
            }
        }
        Err(SYNTAX)
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`, printed as
    /// `numeric` prints the same text.
    fn number(&mut self) -> Result<String, Refusal> {
        let start = self.pos;
        let digits = |s: &mut Self| {
            let from = s.pos;
            while s.bytes.get(s.pos).is_some_and(u8::is_ascii_digit) {
                s.pos += 1;
            }
            s.pos - from
        };
        if self.bytes.get(self.pos) == Some(&b'-') {
            self.pos += 1;
        }
        match self.bytes.get(self.pos) {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return Err(SYNTAX),
        }
        if self.bytes.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            if digits(self) == 0 {
                return Err(SYNTAX);
            }
        }
        if matches!(self.bytes.get(self.pos), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.bytes.get(self.pos), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if digits(self) == 0 {
                return Err(SYNTAX);
            }
        }
        self.token_ends()?;
        canonical_numeric(&self.text[start..self.pos]).ok_or("value overflows numeric format")
    }

    /// A string token, decoded (escapes resolved).
    fn string(&mut self) -> Result<String, Refusal> {
        if self.next_byte() != Some(b'"') {
            return Err(SYNTAX);
        }
        let mut out = String::new();
        loop {
            let run_start = self.pos;
            while let Some(&b) = self.bytes.get(self.pos) {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.pos += 1;
            }
            // Stops only at ASCII bytes, so the run is whole UTF-8.
            out.push_str(&self.text[run_start..self.pos]);
            match self.next_byte() {
                Some(b'"') => return Ok(out),
                Some(b'\\') => self.escape(&mut out)?,
                _ => return Err(SYNTAX),
            }
        }
    }

    fn escape(&mut self, out: &mut String) -> Result<(), Refusal> {
        let c = match self.next_byte() {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                let unit = self.hex4()?;
                let code = match unit {
                    0 => return Err("unsupported Unicode escape sequence"),
                    0xD800..=0xDBFF => {
                        if self.next_byte() != Some(b'\\') || self.next_byte() != Some(b'u') {
                            return Err(SYNTAX);
                        }
                        let low = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&low) {
                            return Err(SYNTAX);
                        }
                        0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)
                    }
                    0xDC00..=0xDFFF => return Err(SYNTAX),
                    other => other,
                };
                char::from_u32(code).ok_or(SYNTAX)?
            }
            _ => return Err(SYNTAX),
        };
        out.push(c);
        Ok(())
    }

    fn hex4(&mut self) -> Result<u32, Refusal> {
        let digits = self.bytes.get(self.pos..self.pos + 4).ok_or(SYNTAX)?;
        let text = std::str::from_utf8(digits).map_err(|_| SYNTAX)?;
        if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SYNTAX);
        }
        self.pos += 4;
        u32::from_str_radix(text, 16).map_err(|_| SYNTAX)
    }
}

/// PostgreSQL's `escape_json`: quotes, backslash and the control
/// characters escaped, everything else as it is.
fn escape(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Prints the document (its root is node 0) without recursion.
fn write(nodes: &[Node]) -> Result<String, Refusal> {
    let mut out = String::new();
    // (container, members written so far)
    let mut stack: Vec<(usize, usize)> = Vec::new();
    let mut next = Some(0usize);
    loop {
        if let Some(index) = next.take() {
            match nodes.get(index).ok_or(SYNTAX)? {
                Node::Scalar(text) => out.push_str(text),
                Node::Array(_) => {
                    out.push('[');
                    stack.push((index, 0));
                }
                Node::Object(_) => {
                    out.push('{');
                    stack.push((index, 0));
                }
            }
            if out.len() > MAX_OUTPUT {
                return Err("jsonb value too large");
            }
        }
        let Some((container, done)) = stack.last_mut() else {
            return Ok(out);
        };
        let position = *done;
        *done += 1;
        if position > 0 {
            out.push_str(", ");
        }
        match &nodes[*container] {
            Node::Array(items) => match items.get(position) {
                Some(&item) => next = Some(item),
                None => {
                    trim_separator(&mut out, position);
                    out.push(']');
                    stack.pop();
                }
            },
            Node::Object(members) => match members.get(position) {
                Some((key, value)) => {
                    escape(key, &mut out);
                    out.push_str(": ");
                    next = Some(*value);
                }
                None => {
                    trim_separator(&mut out, position);
                    out.push('}');
                    stack.pop();
                }
            },
            Node::Scalar(_) => return Err(SYNTAX),
        }
    }
}

/// Takes back the `", "` written before finding there is no next member.
fn trim_separator(out: &mut String, position: usize) {
    if position > 0 {
        out.truncate(out.len() - 2);
    }
}
