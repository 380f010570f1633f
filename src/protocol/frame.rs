//! Frame boundaries in a byte stream: a tag byte and a big-endian length
//! that counts itself but not the tag.

/// Bytes in a frame header: tag (1) + length (4).
pub const HEADER_LEN: usize = 5;

/// The header of one regular protocol message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message type byte.
    pub tag: u8,
    /// Length of the body (the wire length minus its own 4 bytes).
    pub body_len: usize,
}

/// A frame that cannot be part of a valid stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length field is below its own size.
    #[error("invalid message length {len} for message type '{tag}'")]
    BadLength {
        /// Message type as a character.
        tag: char,
        /// The length on the wire.
        len: u32,
    },
    /// The message is larger than the configured limit.
    #[error("message of type '{tag}' with {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Message type as a character.
        tag: char,
        /// The length on the wire.
        len: usize,
        /// The configured limit.
        limit: usize,
    },
}

impl FrameHeader {
    /// Reads a header from the start of `buf`, or `None` if fewer than
    /// [`HEADER_LEN`] bytes are buffered. `limit` caps the body length.
    pub fn peek(buf: &[u8], limit: usize) -> Result<Option<FrameHeader>, FrameError> {
        let Some(head) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let tag = head[0];
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
        if len < 4 {
            return Err(FrameError::BadLength {
                tag: char::from(tag),
                len,
            });
        }
        let body_len = (len - 4) as usize;
        if body_len > limit {
            return Err(FrameError::TooLarge {
                tag: char::from(tag),
                len: len as usize,
                limit,
            });
        }
        Ok(Some(FrameHeader { tag, body_len }))
    }

    /// Total bytes of the frame on the wire.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.body_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_header_asks_for_more() {
        assert_eq!(FrameHeader::peek(b"Q\0\0", 100), Ok(None));
    }

    #[test]
    fn reads_tag_and_body_length() {
        let h = FrameHeader::peek(b"Q\0\0\0\x09abcd", 100).unwrap().unwrap();
        assert_eq!(h.tag, b'Q');
        assert_eq!(h.body_len, 5);
        assert_eq!(h.frame_len(), 10);
    }

    #[test]
    fn rejects_short_and_oversized_lengths() {
        assert!(matches!(
            FrameHeader::peek(b"Q\0\0\0\x03", 100),
            Err(FrameError::BadLength { len: 3, .. })
        ));
        assert!(matches!(
            FrameHeader::peek(b"Q\x7f\xff\xff\xff", 100),
            Err(FrameError::TooLarge { .. })
        ));
    }
}
