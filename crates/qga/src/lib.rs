//! The guest agent protocol both ends speak: QEMU's guest agent protocol
//! (QGA), QMP-style JSON objects over the virtio-serial port
//! [`QGA_PORT`]. Commands are `{"execute": NAME, "arguments": {…}}`;
//! answers `{"return": …}` or `{"error": {"class", "desc"}}`. After every
//! (re)connect the host sends `guest-sync-delimited` with a fresh id: the
//! agent answers with a `0xFF` byte and then the id, so the host can drop
//! whatever a previous conversation left in the pipe.
//!
//! Neither end trusts the other's bytes: [`Framer`] cuts a byte stream
//! into whole top-level JSON objects, skips what is between them (`0xFF`,
//! whitespace, garbage) and refuses an object larger than its bound.

#![forbid(unsafe_code)]

pub mod port;

use base64::Engine as _;

/// The virtio-serial port the guest agent listens on (as with stock
/// `qemu-guest-agent`).
pub const QGA_PORT: &str = "org.qemu.guest_agent.0";

/// The delimiter `guest-sync-delimited` answers are preceded by.
pub const SYNC_DELIMITER: u8 = 0xFF;

/// The largest JSON object either end accepts (a file chunk or an exec's
/// output, base64, fits with room).
pub const MAX_MESSAGE: usize = 4 << 20;

/// Base64 (standard alphabet, padded), as QGA carries bytes.
pub fn encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn decode(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// An object past [`Framer`]'s bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooLong {
    pub limit: usize,
}

/// Cuts a byte stream into top-level JSON objects.
#[derive(Debug)]
pub struct Framer {
    buf: Vec<u8>,
    limit: usize,
    /// Scan state of the object being read.
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl Framer {
    pub fn new(limit: usize) -> Self {
        Framer {
            buf: Vec::new(),
            limit,
            depth: 0,
            in_string: false,
            escaped: false,
        }
    }

    /// Forgets a half-read object (after a timeout, before a new sync).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
    }

    /// Feeds bytes; returns the objects they complete, in order. Bytes
    /// outside an object are dropped. An object past the bound is
    /// dropped too, and reported.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, TooLong> {
        let mut done = Vec::new();
        let mut too_long = false;
        for &byte in bytes {
            if self.depth == 0 {
                if byte == b'{' {
                    self.buf.clear();
                    self.buf.push(byte);
                    self.depth = 1;
                }
                continue;
            }
            if byte == SYNC_DELIMITER {
                // Never inside valid JSON: the other end started over.
                self.reset();
                continue;
            }
            self.buf.push(byte);
            if self.in_string {
                match (self.escaped, byte) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
            } else {
                match byte {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => self.depth -= 1,
                    _ => {}
                }
                if self.depth == 0 {
                    done.push(std::mem::take(&mut self.buf));
                }
            }
            if self.buf.len() > self.limit {
                self.reset();
                too_long = true;
            }
        }
        if too_long && done.is_empty() {
            return Err(TooLong { limit: self.limit });
        }
        Ok(done)
    }
}

/// A QGA error answer.
pub fn error(class: &str, desc: &str) -> serde_json::Value {
    serde_json::json!({ "error": { "class": class, "desc": desc } })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn cuts_objects_out_of_a_stream_with_garbage_and_delimiters() {
        let mut framer = Framer::new(1024);
        let mut stream = Vec::new();
        stream.extend_from_slice(b"junk \xff");
        stream.extend_from_slice(br#"{"return": {"a": "x}{\"y"}}"#);
        stream.extend_from_slice(b"\n{\"ret");

        let first = framer.push(&stream).unwrap();
        let second = framer.push(b"urn\": [1, {}]}\n").unwrap();

        assert_eq!(first, vec![br#"{"return": {"a": "x}{\"y"}}"#.to_vec()]);
        assert_eq!(second, vec![br#"{"return": [1, {}]}"#.to_vec()]);
    }

    #[test]
    fn a_delimiter_inside_an_object_starts_over() {
        let mut framer = Framer::new(1024);

        let objects = framer.push(b"{\"half\": \xff{\"return\": 7}").unwrap();

        assert_eq!(objects, vec![b"{\"return\": 7}".to_vec()]);
    }

    #[test]
    fn an_object_past_the_bound_is_dropped_and_reported() {
        let mut framer = Framer::new(16);

        let long = framer.push(br#"{"a": "0123456789abcdef"}"#);
        let next = framer.push(br#"{"b": 1}"#).unwrap();

        assert_eq!(long, Err(TooLong { limit: 16 }));
        assert_eq!(next, vec![br#"{"b": 1}"#.to_vec()]);
    }

    #[test]
    fn bytes_go_through_base64_and_back() {
        assert_eq!(encode(b"hi\n"), "aGkK");
        assert_eq!(decode("aGkK").unwrap(), b"hi\n");
        assert_eq!(decode("not base64!"), None);
    }
}
