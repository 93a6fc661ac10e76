//! The local terminal as a VM console: raw mode while attached, and the
//! escape key that leaves.

use std::io::{IsTerminal, Read};
use std::os::fd::AsFd;
use std::process::ExitCode;

use futures_util::{SinkExt, StreamExt};
use nix::sys::termios::{self, SetArg, Termios};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::client::{Client, Target, encode};

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

/// Reads stdin on a plain thread (a blocking read must not hold up the
/// runtime); the channel closes at end of input.
pub fn stdin_reader() -> mpsc::UnboundedReceiver<Vec<u8>> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

/// `quetzal vm console NAME`: the VM's serial console through quetzald's
/// WebSocket, recent output first. Ctrl-] detaches; the VM keeps running.
pub async fn attach_remote(client: &Client, name: &str) -> anyhow::Result<ExitCode> {
    let vm: quetzal_api::Vm = client
        .call_as(
            hyper::Method::GET,
            &format!("/api/v1/vms/{}", encode(name)),
            None,
        )
        .await?;
    let stream = client.connect().await?;
    let mut request =
        format!("ws://localhost/api/v1/vms/{}/console", encode(name)).into_client_request()?;
    if let Target::Tcp { token, .. } = client.target() {
        request.headers_mut().insert(
            hyper::header::AUTHORIZATION,
            format!("Bearer {token}").parse()?,
        );
    }
    let (mut socket, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .map_err(refusal)?;
    let terminal = RawTerminal::enter()?;
    if terminal.is_some() {
        eprint!(
            "quetzal: console of {} ({}); {ESCAPE_NAME} detaches\r\n",
            vm.name,
            vm.state.as_str()
        );
    }
    let watch_escape = terminal.is_some();
    let mut keys = stdin_reader();
    let mut stdout = tokio::io::stdout();
    let mut detached = false;
    loop {
        tokio::select! {
            message = socket.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    stdout.write_all(&bytes).await?;
                    stdout.flush().await?;
                }
                Some(Ok(Message::Text(text))) => {
                    stdout.write_all(text.as_bytes()).await?;
                    stdout.flush().await?;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
            key = keys.recv() => match key {
                Some(bytes) if watch_escape && bytes.contains(&ESCAPE) => {
                    let before = bytes.split(|&b| b == ESCAPE).next().unwrap_or_default();
                    if !before.is_empty() {
                        socket.send(Message::Binary(before.to_vec().into())).await?;
                    }
                    detached = true;
                    break;
                }
                Some(bytes) => socket.send(Message::Binary(bytes.into())).await?,
                None => keys = mpsc::unbounded_channel().1,
            },
        }
    }
    let _ = socket.close(None).await;
    drop(terminal);
    if detached {
        eprintln!("quetzal: detached from {name}");
    }
    std::io::Write::flush(&mut std::io::stdout())?;
    // The stdin reader thread may sit in a blocking read: leave without it.
    std::process::exit(0);
}

/// A refused upgrade as the API's own message (`VM … has 8 viewers
/// already`), not only its status line.
fn refusal(err: tokio_tungstenite::tungstenite::Error) -> anyhow::Error {
    if let tokio_tungstenite::tungstenite::Error::Http(response) = &err
        && let Some(body) = response.body()
        && let Ok(body) = serde_json::from_slice::<quetzal_api::ErrorBody>(body)
    {
        return anyhow::anyhow!("{}", body.error.message);
    }
    err.into()
}
