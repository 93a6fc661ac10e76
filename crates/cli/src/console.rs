//! The local terminal as a VM console: raw mode while attached, and the
//! escape key that leaves.

use std::io::IsTerminal;
use std::os::fd::AsFd;

use nix::sys::termios::{self, SetArg, Termios};

/// Ctrl-] (as in telnet and `virsh console`): stops the VM and leaves.
pub const ESCAPE: u8 = 0x1d;
pub const ESCAPE_NAME: &str = "Ctrl-]";

/// Puts stdin's terminal in raw mode (keys go to the guest as typed, Ctrl-C
/// included) and restores it when dropped.
#[derive(Debug)]
pub struct RawTerminal {
    saved: Termios,
}

impl RawTerminal {
    /// `None` when stdin is not a terminal (a pipe, a file): then nothing is
    /// changed and no escape key is watched for.
    pub fn enter() -> std::io::Result<Option<Self>> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSADRAIN, &raw)?;
        Ok(Some(RawTerminal { saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSADRAIN, &self.saved);
    }
}
