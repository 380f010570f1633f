//! KMIP's Tag-Type-Length-Value encoding (KMIP 1.x spec, section 9.1): the
//! few item types the provider sends and reads. Decoding takes bytes from
//! the network and so checks every length and bounds the nesting depth.

/// A KMIP tag (`0x42XXXX`).
pub type Tag = u32;

/// Deepest structure nesting accepted from a server.
const MAX_DEPTH: usize = 16;

/// A TTLV value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// Type 0x01: nested items.
    Structure(Vec<Item>),
    /// Type 0x02.
    Integer(i32),
    /// Type 0x03.
    LongInteger(i64),
    /// Type 0x05.
    Enumeration(u32),
    /// Type 0x06.
    Boolean(bool),
    /// Type 0x07 (UTF-8).
    Text(String),
    /// Type 0x08.
    Bytes(Vec<u8>),
    /// Type 0x09: seconds since the epoch.
    DateTime(i64),
    /// Types the provider never interprets (big integer, interval): kept raw.
    Other(u8, Vec<u8>),
}

/// One tagged item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The item's tag.
    pub tag: Tag,
    /// Its value.
    pub value: Value,
}

/// Why bytes from the server are not TTLV.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TtlvError {
    /// The buffer ends inside an item.
    #[error("truncated TTLV item")]
    Truncated,
    /// A fixed-size type carries the wrong length, or a bad boolean/UTF-8.
    #[error("malformed TTLV item (tag {tag:#08x}, type {kind:#04x})")]
    Malformed {
        /// Tag of the item.
        tag: Tag,
        /// Its type byte.
        kind: u8,
    },
    /// Structures nested deeper than any KMIP response needs.
    #[error("TTLV nested too deeply")]
    TooDeep,
}

impl Item {
    /// A structure item.
    pub fn structure(tag: Tag, items: Vec<Item>) -> Item {
        Item {
            tag,
            value: Value::Structure(items),
        }
    }

    /// An item of any other value.
    pub fn new(tag: Tag, value: Value) -> Item {
        Item { tag, value }
    }

    /// The first direct child with `tag`, if this is a structure.
    pub fn child(&self, tag: Tag) -> Option<&Item> {
        match &self.value {
            Value::Structure(items) => items.iter().find(|i| i.tag == tag),
            _ => None,
        }
    }

    /// The enumeration value of the child `tag`.
    pub fn enumeration(&self, tag: Tag) -> Option<u32> {
        match self.child(tag)?.value {
            Value::Enumeration(v) => Some(v),
            _ => None,
        }
    }

    /// The bytes of the child `tag`.
    pub fn bytes(&self, tag: Tag) -> Option<&[u8]> {
        match &self.child(tag)?.value {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// The text of the child `tag`.
    pub fn text(&self, tag: Tag) -> Option<&str> {
        match &self.child(tag)?.value {
            Value::Text(t) => Some(t),
            _ => None,
        }
    }

    /// Appends the encoding of this item to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.tag.to_be_bytes()[1..]);
        let (kind, body): (u8, Vec<u8>) = match &self.value {
            Value::Structure(items) => {
                let mut body = Vec::new();
                for item in items {
                    item.encode(&mut body);
                }
                (0x01, body)
            }
            Value::Integer(v) => (0x02, v.to_be_bytes().to_vec()),
            Value::LongInteger(v) => (0x03, v.to_be_bytes().to_vec()),
            Value::Enumeration(v) => (0x05, v.to_be_bytes().to_vec()),
            Value::Boolean(v) => (0x06, u64::from(*v).to_be_bytes().to_vec()),
            Value::Text(t) => (0x07, t.as_bytes().to_vec()),
            Value::Bytes(b) => (0x08, b.clone()),
            Value::DateTime(v) => (0x09, v.to_be_bytes().to_vec()),
            Value::Other(kind, raw) => (*kind, raw.clone()),
        };
        out.push(kind);
        // Request items are built by this module from small values.
        let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&body);
        out.resize(out.len() + padding(body.len()), 0);
    }

    /// Decodes one whole message (a single top-level item).
    pub fn decode(buf: &[u8]) -> Result<Item, TtlvError> {
        let (item, used) = decode_item(buf, 0)?;
        if used != buf.len() {
            return Err(TtlvError::Truncated);
        }
        Ok(item)
    }
}

/// Zero bytes after a value of `len` bytes up to the next multiple of 8.
fn padding(len: usize) -> usize {
    (8 - len % 8) % 8
}

/// The total length (header included) of the message whose 8-byte header
/// is `header`.
pub fn message_len(header: &[u8; 8]) -> usize {
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    8 + len as usize
}

fn decode_item(buf: &[u8], depth: usize) -> Result<(Item, usize), TtlvError> {
    if depth > MAX_DEPTH {
        return Err(TtlvError::TooDeep);
    }
    let header: &[u8; 8] = buf
        .get(..8)
        .and_then(|h| h.try_into().ok())
        .ok_or(TtlvError::Truncated)?;
    let tag = u32::from_be_bytes([0, header[0], header[1], header[2]]);
    let kind = header[3];
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    let end = 8usize.checked_add(len).ok_or(TtlvError::Truncated)?;
    let body = buf.get(8..end).ok_or(TtlvError::Truncated)?;
    let padded = end.checked_add(padding(len)).ok_or(TtlvError::Truncated)?;
    // Structures are a multiple of 8 long, so need no padding of their own.
    let used = if kind == 0x01 { end } else { padded };
    if used > buf.len() {
        return Err(TtlvError::Truncated);
    }
    let malformed = TtlvError::Malformed { tag, kind };
    let fixed = |n: usize| -> Result<&[u8], TtlvError> {
        if body.len() == n {
            Ok(body)
        } else {
            Err(malformed.clone())
        }
    };
    let value = match kind {
        0x01 => {
            let mut items = Vec::new();
            let mut at = 0;
            while at < body.len() {
                let (item, n) = decode_item(&body[at..], depth + 1)?;
                items.push(item);
                at += n;
            }
            Value::Structure(items)
        }
        0x02 => Value::Integer(i32::from_be_bytes(
            fixed(4)?.try_into().map_err(|_| malformed.clone())?,
        )),
        0x05 => Value::Enumeration(u32::from_be_bytes(
            fixed(4)?.try_into().map_err(|_| malformed.clone())?,
        )),
        0x03 | 0x06 | 0x09 => {
            let v = i64::from_be_bytes(fixed(8)?.try_into().map_err(|_| malformed.clone())?);
            match kind {
                0x03 => Value::LongInteger(v),
                0x09 => Value::DateTime(v),
                _ if v == 0 || v == 1 => Value::Boolean(v == 1),
                _ => return Err(malformed),
            }
        }
        0x07 => Value::Text(String::from_utf8(body.to_vec()).map_err(|_| malformed.clone())?),
        0x08 => Value::Bytes(body.to_vec()),
        other => Value::Other(other, body.to_vec()),
    };
    Ok((Item { tag, value }, used))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KMIP 1.2 spec, 9.1.2 examples: an Integer 8 and a Text "Hello World".
    #[test]
    fn encodes_the_spec_examples() {
        let mut out = Vec::new();
        Item::new(0x420020, Value::Integer(8)).encode(&mut out);
        assert_eq!(
            out,
            [0x42, 0x00, 0x20, 0x02, 0, 0, 0, 4, 0, 0, 0, 8, 0, 0, 0, 0]
        );
        let mut out = Vec::new();
        Item::new(0x420020, Value::Text("Hello World".into())).encode(&mut out);
        assert_eq!(&out[..8], &[0x42, 0x00, 0x20, 0x07, 0, 0, 0, 0x0b]);
        assert_eq!(&out[8..19], b"Hello World");
        assert_eq!(out.len(), 24);
    }

    #[test]
    fn round_trips_a_nested_structure() {
        let item = Item::structure(
            0x420078,
            vec![
                Item::new(0x42006a, Value::Integer(1)),
                Item::new(0x420011, Value::Enumeration(9)),
                Item::new(0x4200c2, Value::Bytes(vec![1, 2, 3])),
                Item::new(0x420094, Value::Text("7".into())),
                Item::structure(0x420008, vec![Item::new(0x420006, Value::Boolean(true))]),
                Item::new(0x420003, Value::LongInteger(-5)),
            ],
        );
        let mut out = Vec::new();
        item.encode(&mut out);
        assert_eq!(out.len() % 8, 0);
        let header: [u8; 8] = out[..8].try_into().unwrap();
        assert_eq!(message_len(&header), out.len());
        assert_eq!(Item::decode(&out).unwrap(), item);
        assert_eq!(item.enumeration(0x420011), Some(9));
        assert_eq!(item.bytes(0x4200c2), Some(&[1u8, 2, 3][..]));
        assert_eq!(item.text(0x420094), Some("7"));
    }

    #[test]
    fn rejects_truncated_malformed_and_deep_input_without_panicking() {
        let mut good = Vec::new();
        Item::structure(0x420078, vec![Item::new(0x420020, Value::Integer(8))]).encode(&mut good);
        for cut in 0..good.len() {
            assert!(Item::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let bad_int = [0x42, 0, 0x20, 0x02, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            Item::decode(&bad_int),
            Err(TtlvError::Malformed { .. })
        ));
        let huge = [0x42, 0, 0x20, 0x08, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(Item::decode(&huge), Err(TtlvError::Truncated));
        let mut deep = Item::new(0x420020, Value::Integer(1));
        for _ in 0..40 {
            deep = Item::structure(0x420001, vec![deep]);
        }
        let mut out = Vec::new();
        deep.encode(&mut out);
        assert_eq!(Item::decode(&out), Err(TtlvError::TooDeep));
    }
}
