//! Follows what an RFB (VNC) client sends, without changing a byte of it,
//! to tell a user's input (keys, the pointer, pasted text) from what a
//! viewer sends by itself (update requests, encodings): a screen with
//! input is a desktop its user is at.
//!
//! Only message headers are kept (at most 12 bytes); bodies are skipped
//! by length, so a client cannot make us buffer anything. A message this
//! scanner does not know ends the scanning (the relay goes on).

/// Where in the client's stream the scanner is.
#[derive(Debug)]
enum Stage {
    /// `RFB 003.00x\n`.
    Version,
    /// The security type the client chose (3.7 and 3.8).
    Security,
    /// `ClientInit`: the shared flag.
    Init,
    Messages,
    /// Something it does not know: no more scanning.
    Lost,
}

#[derive(Debug)]
pub struct ClientScanner {
    stage: Stage,
    header: Vec<u8>,
    skip: u64,
}

impl Default for ClientScanner {
    fn default() -> Self {
        ClientScanner {
            stage: Stage::Version,
            header: Vec::with_capacity(12),
            skip: 0,
        }
    }
}

/// What a message's first bytes say.
enum Header {
    /// More bytes are needed to tell its length.
    More,
    Known {
        len: u64,
        input: bool,
    },
    Unknown,
}

impl ClientScanner {
    /// Takes the next bytes the client sent; whether they held input.
    pub fn feed(&mut self, mut bytes: &[u8]) -> bool {
        let mut input = false;
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = usize::try_from(self.skip)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                self.skip -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            match self.stage {
                Stage::Lost => return input,
                Stage::Version => {
                    self.header.push(bytes[0]);
                    bytes = &bytes[1..];
                    if self.header.len() == 12 {
                        // 3.3 has no security choice from the client.
                        let old = self.header.starts_with(b"RFB 003.003");
                        self.stage = if old { Stage::Init } else { Stage::Security };
                        self.header.clear();
                    }
                }
                Stage::Security => {
                    // Only `None` (1) is followed by ClientInit at once.
                    self.stage = if bytes[0] == 1 {
                        Stage::Init
                    } else {
                        Stage::Lost
                    };
                    bytes = &bytes[1..];
                }
                Stage::Init => {
                    self.stage = Stage::Messages;
                    bytes = &bytes[1..];
                }
                Stage::Messages => {
                    self.header.push(bytes[0]);
                    bytes = &bytes[1..];
                    match header(&self.header) {
                        Header::More => {}
                        Header::Unknown => self.stage = Stage::Lost,
                        Header::Known { len, input: is } => {
                            input |= is;
                            self.skip = len.saturating_sub(self.header.len() as u64);
                            self.header.clear();
                        }
                    }
                }
            }
        }
        input
    }
}

/// A client message's length and whether it is input, from its first
/// bytes (RFC 6143 §7.5, and the extensions QEMU and noVNC use).
fn header(h: &[u8]) -> Header {
    let u16_at = |at: usize| u64::from(u16::from_be_bytes([h[at], h[at + 1]]));
    let fixed = |len: u64, input: bool| {
        if h.len() as u64 >= len.min(12) {
            Header::Known { len, input }
        } else {
            Header::More
        }
    };
    match h[0] {
        // SetPixelFormat.
        0 => fixed(20, false),
        // SetEncodings: a count, then 4 bytes each.
        2 if h.len() < 4 => Header::More,
        2 => Header::Known {
            len: 4 + 4 * u16_at(2),
            input: false,
        },
        // FramebufferUpdateRequest.
        3 => fixed(10, false),
        // KeyEvent.
        4 => fixed(8, true),
        // PointerEvent.
        5 => fixed(6, true),
        // ClientCutText: a length (negative: the extended clipboard's).
        6 if h.len() < 8 => Header::More,
        6 => {
            let len = i32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            Header::Known {
                len: 8 + u64::from(len.unsigned_abs()),
                input: true,
            }
        }
        // EnableContinuousUpdates.
        150 => fixed(10, false),
        // ClientFence: a payload length at byte 8.
        248 if h.len() < 9 => Header::More,
        248 => Header::Known {
            len: 9 + u64::from(h[8]),
            input: false,
        },
        // SetDesktopSize: screens of 16 bytes, counted at byte 6.
        251 if h.len() < 8 => Header::More,
        251 => Header::Known {
            len: 8 + 16 * u64::from(h[6]),
            input: false,
        },
        // QEMU's: extended key event (0), audio (1: enable, disable or
        // set format).
        255 if h.len() < 2 => Header::More,
        255 => match h[1] {
            0 => fixed(12, true),
            1 if h.len() < 4 => Header::More,
            1 => match u16_at(2) {
                0 | 1 => Header::Known {
                    len: 4,
                    input: false,
                },
                2 => fixed(10, false),
                _ => Header::Unknown,
            },
            _ => Header::Unknown,
        },
        _ => Header::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What noVNC sends on connecting to QEMU (RFB 3.8, no security).
    fn handshake() -> Vec<u8> {
        let mut bytes = b"RFB 003.008\n".to_vec();
        bytes.extend([1, 1]);
        bytes
    }

    fn set_encodings(count: u16) -> Vec<u8> {
        let mut bytes = vec![2, 0];
        bytes.extend(count.to_be_bytes());
        bytes.extend(std::iter::repeat_n(0u8, 4 * usize::from(count)));
        bytes
    }

    const UPDATE_REQUEST: [u8; 10] = [3, 1, 0, 0, 0, 0, 5, 0, 3, 32];
    const KEY: [u8; 8] = [4, 1, 0, 0, 0, 0, 0, 0x61];
    const POINTER: [u8; 6] = [5, 0, 0, 10, 0, 20];

    #[test]
    fn a_viewers_own_messages_are_not_input_and_keys_and_the_pointer_are() {
        let mut scanner = ClientScanner::default();
        let mut quiet = handshake();
        quiet.extend(set_encodings(300));
        for _ in 0..50 {
            quiet.extend(UPDATE_REQUEST);
        }

        assert!(!scanner.feed(&quiet));
        assert!(scanner.feed(&KEY));
        assert!(!scanner.feed(&UPDATE_REQUEST));
        assert!(scanner.feed(&POINTER));
        // QEMU's extended key event.
        assert!(scanner.feed(&[255, 0, 0, 1, 0, 0, 0, 0x61, 0, 0, 0, 0x1e]));
        assert!(!scanner.feed(&UPDATE_REQUEST));
    }

    #[test]
    fn messages_split_anywhere_are_followed() {
        let mut stream = handshake();
        stream.extend(set_encodings(3));
        stream.extend(UPDATE_REQUEST);
        let mut cut = vec![6, 0, 0, 0, 0, 0, 0, 5];
        cut.extend(b"hello");
        stream.extend(cut);
        stream.extend(UPDATE_REQUEST);

        for chunk in [1, 2, 3, 7] {
            let mut scanner = ClientScanner::default();
            let inputs = stream
                .chunks(chunk)
                .filter(|piece| scanner.feed(piece))
                .count();
            assert!(inputs >= 1, "chunks of {chunk}");
            assert!(
                !scanner.feed(&UPDATE_REQUEST),
                "in step after chunks of {chunk}"
            );
            assert!(scanner.feed(&KEY), "in step after chunks of {chunk}");
        }
    }

    #[test]
    fn an_unknown_message_ends_the_scanning_and_keeps_nothing() {
        let mut scanner = ClientScanner::default();
        scanner.feed(&handshake());

        assert!(!scanner.feed(&[77, 1, 2, 3]));
        assert!(!scanner.feed(&KEY));
        // A huge claimed length is skipped, never buffered.
        let mut other = ClientScanner::default();
        other.feed(&handshake());
        other.feed(&[6, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff]);
        assert!(other.header.capacity() <= 12);
        assert!(!other.feed(&KEY), "inside the pasted text");
    }
}
