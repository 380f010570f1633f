//! The extended-protocol and result messages the proxy decodes and
//! re-encodes when a statement touches protected columns: Parse, Bind,
//! ParameterDescription, RowDescription and DataRow. Bodies borrow from the
//! frame; encoding appends to a caller-owned buffer.

use bytes::{BufMut, BytesMut};

/// A message body that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {0} message")]
pub struct Malformed(pub &'static str);

/// A cursor over a message body.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }
    fn err(&self) -> Malformed {
        Malformed(self.what)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(self.err());
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, Malformed> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn i16(&mut self) -> Result<i16, Malformed> {
        Ok(self.u16()? as i16)
    }
    fn u32(&mut self) -> Result<u32, Malformed> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i32(&mut self) -> Result<i32, Malformed> {
        Ok(self.u32()? as i32)
    }
    fn cstr(&mut self) -> Result<&'a str, Malformed> {
        let end = self.buf.iter().position(|b| *b == 0).ok_or(self.err())?;
        let text = std::str::from_utf8(&self.buf[..end]).map_err(|_| self.err())?;
        self.buf = &self.buf[end + 1..];
        Ok(text)
    }
    /// A length-prefixed value; `None` for SQL NULL (length -1). Any other
    /// negative length is malformed, as PostgreSQL has it.
    fn value(&mut self) -> Result<Option<&'a [u8]>, Malformed> {
        let len = self.i32()?;
        if len == -1 {
            return Ok(None);
        }
        let len = usize::try_from(len).map_err(|_| self.err())?;
        self.take(len).map(Some)
    }
    fn done(&self) -> Result<(), Malformed> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.err())
        }
    }
}

/// Writes a frame header with a placeholder length; returns its position.
fn begin(out: &mut BytesMut, tag: u8) -> usize {
    let start = out.len();
    out.put_u8(tag);
    out.put_u32(0);
    start
}

/// Fills in the length of the frame started at `start`.
fn finish(out: &mut BytesMut, start: usize) {
    let len = (out.len() - start - 1) as u32;
    out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(out: &mut BytesMut, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.put_u8(0);
}

fn put_value(out: &mut BytesMut, value: Option<&[u8]>) {
    match value {
        Some(v) => {
            out.put_i32(v.len() as i32);
            out.extend_from_slice(v);
        }
        None => out.put_i32(-1),
    }
}

/// Parse (`P`): a statement name, its SQL and declared parameter types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse<'a> {
    /// Statement name (`""` = unnamed).
    pub name: &'a str,
    /// SQL text.
    pub query: &'a str,
    /// Declared parameter type OIDs (0 = unspecified).
    pub param_types: Vec<u32>,
}

impl<'a> Parse<'a> {
    /// Decodes a Parse body.
    pub fn decode(body: &'a [u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "Parse");
        let name = r.cstr()?;
        let query = r.cstr()?;
        let count = r.u16()?;
        let param_types = (0..count).map(|_| r.u32()).collect::<Result<_, _>>()?;
        r.done()?;
        Ok(Self {
            name,
            query,
            param_types,
        })
    }

    /// Appends the encoded frame.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = begin(out, b'P');
        put_cstr(out, self.name);
        put_cstr(out, self.query);
        out.put_u16(self.param_types.len() as u16);
        for oid in &self.param_types {
            out.put_u32(*oid);
        }
        finish(out, start);
    }
}

/// Bind (`B`): portal, statement, parameter values and formats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind<'a> {
    /// Portal name.
    pub portal: &'a str,
    /// Statement name.
    pub statement: &'a str,
    /// Parameter format codes as sent (0, 1 or one per parameter).
    pub param_formats: Vec<i16>,
    /// Parameter values (`None` = NULL).
    pub params: Vec<Option<&'a [u8]>>,
    /// Result format codes as sent.
    pub result_formats: Vec<i16>,
}

/// The format code that applies to item `i` of `n` given a format list
/// (none = text, one = for all, else one each).
pub fn format_of(formats: &[i16], i: usize) -> i16 {
    match formats {
        [] => 0,
        [one] => *one,
        many => many.get(i).copied().unwrap_or(0),
    }
}

impl<'a> Bind<'a> {
    /// Decodes a Bind body.
    pub fn decode(body: &'a [u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(body, "Bind");
        let portal = r.cstr()?;
        let statement = r.cstr()?;
        let nformats = r.u16()?;
        let param_formats: Vec<i16> = (0..nformats).map(|_| r.i16()).collect::<Result<_, _>>()?;
        let nparams = r.u16()?;
        let params: Vec<Option<&[u8]>> =
            (0..nparams).map(|_| r.value()).collect::<Result<_, _>>()?;
        let nresults = r.u16()?;
        let result_formats: Vec<i16> = (0..nresults).map(|_| r.i16()).collect::<Result<_, _>>()?;
        r.done()?;
        // PostgreSQL refuses these (08P01): formats neither none, one for
        // all, nor one each; a format code other than text or binary.
        let formats_fit = param_formats.len() <= 1 || param_formats.len() == params.len();
        let codes_known = param_formats
            .iter()
            .chain(&result_formats)
            .all(|f| matches!(f, 0 | 1));
        if !formats_fit || !codes_known {
            return Err(r.err());
        }
        Ok(Self {
            portal,
            statement,
            param_formats,
            params,
            result_formats,
        })
    }

    /// Appends the encoded frame.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = begin(out, b'B');
        put_cstr(out, self.portal);
        put_cstr(out, self.statement);
        out.put_u16(self.param_formats.len() as u16);
        for f in &self.param_formats {
            out.put_i16(*f);
        }
        out.put_u16(self.params.len() as u16);
        for p in &self.params {
            put_value(out, *p);
        }
        out.put_u16(self.result_formats.len() as u16);
        for f in &self.result_formats {
            out.put_i16(*f);
        }
        finish(out, start);
    }
}

/// ParameterDescription (`t`): the parameter type OIDs of a statement.
pub fn decode_parameter_description(body: &[u8]) -> Result<Vec<u32>, Malformed> {
    let mut r = Reader::new(body, "ParameterDescription");
    let count = r.u16()?;
    let oids = (0..count).map(|_| r.u32()).collect::<Result<_, _>>()?;
    r.done()?;
    Ok(oids)
}

/// Appends a ParameterDescription frame.
pub fn encode_parameter_description(oids: &[u32], out: &mut BytesMut) {
    let start = begin(out, b't');
    out.put_u16(oids.len() as u16);
    for oid in oids {
        out.put_u32(*oid);
    }
    finish(out, start);
}

/// One field of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<'a> {
    /// Column label.
    pub name: &'a str,
    /// Source table OID (0 if not a plain column).
    pub table_oid: u32,
    /// Source column number (0 if not a plain column).
    pub column: i16,
    /// Type OID.
    pub type_oid: u32,
    /// Type size (negative = variable).
    pub type_size: i16,
    /// Type modifier.
    pub type_modifier: i32,
    /// 0 = text, 1 = binary.
    pub format: i16,
}

/// RowDescription (`T`).
pub fn decode_row_description(body: &[u8]) -> Result<Vec<Field<'_>>, Malformed> {
    let mut r = Reader::new(body, "RowDescription");
    let count = r.u16()?;
    let mut fields = Vec::with_capacity(count as usize);
    for _ in 0..count {
        fields.push(Field {
            name: r.cstr()?,
            table_oid: r.u32()?,
            column: r.i16()?,
            type_oid: r.u32()?,
            type_size: r.i16()?,
            type_modifier: r.i32()?,
            format: r.i16()?,
        });
    }
    r.done()?;
    Ok(fields)
}

/// Appends a RowDescription frame.
pub fn encode_row_description(fields: &[Field<'_>], out: &mut BytesMut) {
    let start = begin(out, b'T');
    out.put_u16(fields.len() as u16);
    for f in fields {
        put_cstr(out, f.name);
        out.put_u32(f.table_oid);
        out.put_i16(f.column);
        out.put_u32(f.type_oid);
        out.put_i16(f.type_size);
        out.put_i32(f.type_modifier);
        out.put_i16(f.format);
    }
    finish(out, start);
}

/// DataRow (`D`): the column values (`None` = NULL).
pub fn decode_data_row(body: &[u8]) -> Result<Vec<Option<&[u8]>>, Malformed> {
    let mut r = Reader::new(body, "DataRow");
    let count = r.u16()?;
    let values = (0..count).map(|_| r.value()).collect::<Result<_, _>>()?;
    r.done()?;
    Ok(values)
}

/// Appends a DataRow frame.
pub fn encode_data_row<'v>(values: impl Iterator<Item = Option<&'v [u8]>>, out: &mut BytesMut) {
    let start = begin(out, b'D');
    let count_at = out.len();
    out.put_u16(0);
    let mut count: u16 = 0;
    for v in values {
        put_value(out, v);
        count = count.wrapping_add(1);
    }
    out[count_at..count_at + 2].copy_from_slice(&count.to_be_bytes());
    finish(out, start);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::HEADER_LEN;

    #[test]
    fn parse_round_trips() {
        let p = Parse {
            name: "s1",
            query: "INSERT INTO t VALUES ($1, $2)",
            param_types: vec![25, 0],
        };
        let mut out = BytesMut::new();
        p.encode(&mut out);
        assert_eq!(Parse::decode(&out[HEADER_LEN..]).unwrap(), p);
    }

    #[test]
    fn binds_that_postgresql_refuses_are_malformed() {
        let encoded = |b: &Bind<'_>| {
            let mut out = BytesMut::new();
            b.encode(&mut out);
            out[HEADER_LEN..].to_vec()
        };
        let three = vec![Some(&b"a"[..]), Some(&b"b"[..]), Some(&b"c"[..])];
        let bind = |param_formats: Vec<i16>, result_formats: Vec<i16>| Bind {
            portal: "",
            statement: "",
            param_formats,
            params: three.clone(),
            result_formats,
        };
        // Two format codes for three parameters; a format code 2.
        assert!(Bind::decode(&encoded(&bind(vec![0, 1], vec![]))).is_err());
        assert!(Bind::decode(&encoded(&bind(vec![2], vec![]))).is_err());
        assert!(Bind::decode(&encoded(&bind(vec![], vec![0, 3]))).is_err());
        assert!(Bind::decode(&encoded(&bind(vec![0, 1, 0], vec![]))).is_ok());
        // A parameter length of -2 (not NULL, not a length).
        let mut body = encoded(&Bind {
            params: vec![None],
            ..bind(vec![], vec![])
        });
        let at = body.len() - 2 - 4;
        body[at..at + 4].copy_from_slice(&(-2i32).to_be_bytes());
        assert!(Bind::decode(&body).is_err());
        body[at..at + 4].copy_from_slice(&(-1i32).to_be_bytes());
        assert!(Bind::decode(&body).is_ok());
    }

    #[test]
    fn bind_round_trips_with_nulls() {
        let b = Bind {
            portal: "",
            statement: "s1",
            param_formats: vec![1],
            params: vec![Some(b"abc"), None],
            result_formats: vec![0, 1],
        };
        let mut out = BytesMut::new();
        b.encode(&mut out);
        assert_eq!(Bind::decode(&out[HEADER_LEN..]).unwrap(), b);
        assert_eq!(format_of(&b.param_formats, 5), 1);
        assert_eq!(format_of(&[], 0), 0);
        assert_eq!(format_of(&b.result_formats, 1), 1);
    }

    #[test]
    fn row_description_and_data_row_round_trip() {
        let fields = vec![Field {
            name: "ssn",
            table_oid: 16384,
            column: 3,
            type_oid: 17,
            type_size: -1,
            type_modifier: -1,
            format: 1,
        }];
        let mut out = BytesMut::new();
        encode_row_description(&fields, &mut out);
        assert_eq!(decode_row_description(&out[HEADER_LEN..]).unwrap(), fields);
        let mut row = BytesMut::new();
        encode_data_row([Some(&b"x"[..]), None].into_iter(), &mut row);
        assert_eq!(
            decode_data_row(&row[HEADER_LEN..]).unwrap(),
            vec![Some(&b"x"[..]), None]
        );
    }

    #[test]
    fn truncated_bodies_are_malformed_not_panics() {
        assert!(Bind::decode(b"\0s\0\0\x01").is_err());
        assert!(decode_data_row(b"\0\x01\0\0\0\x09ab").is_err());
        assert!(decode_row_description(b"\0\x01name").is_err());
        assert!(Parse::decode(b"x\0y\0\0\x01\0").is_err());
    }
}
