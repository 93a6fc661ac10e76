//! What a console or VNC client sends over its WebSocket, read with the
//! limits quetzald sets: frames are read or refused, a message never
//! grows past the limit, nothing panics.
#![no_main]

use std::io::{Cursor, Read, Write};

use libfuzzer_sys::fuzz_target;
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};

/// The client's bytes in, our answers out (dropped).
struct Wire(Cursor<Vec<u8>>);

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    for limit in [
        quetzal_node::http::CONSOLE_MAX_MESSAGE,
        quetzal_node::http::VNC_MAX_MESSAGE,
    ] {
        let config = WebSocketConfig::default()
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit));
        let mut socket =
            WebSocket::from_raw_socket(Wire(Cursor::new(data.to_vec())), Role::Server, Some(config));
        while let Ok(message) = socket.read() {
            assert!(message.len() <= limit, "a message past the limit");
        }
    }
});
