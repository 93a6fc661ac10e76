//! The CLI's way to quetzald: HTTP/1.1 over the daemon's Unix socket (or
//! over HTTPS with a token, when `QUETZAL_URL` is set; the server is
//! trusted by its pinned certificate fingerprint, see [`crate::trust`]).

use std::path::PathBuf;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use quetzal_api::ErrorBody;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};

/// An error from talking to the daemon; its message is one line.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "quetzald is not running (no answer on {path}); start it with `quetzald` or `quetzal up`"
    )]
    NotRunning { path: String },
    #[error("cannot reach quetzald at {target}: {message}")]
    Connect { target: String, message: String },
    #[error(
        "quetzald at {authority} is not trusted yet: its certificate's SHA-256 fingerprint is {seen}; if `quetzal token` on that node prints the same, pass --fingerprint {seen} (or set QUETZAL_FINGERPRINT)"
    )]
    Untrusted { authority: String, seen: String },
    #[error(
        "refusing quetzald at {authority}: its certificate's SHA-256 fingerprint is {seen}, not the pinned {pinned} (someone may be in between; if the node's certificate was replaced, pin the new one with --fingerprint)"
    )]
    Mismatch {
        authority: String,
        seen: String,
        pinned: String,
    },
    #[error("{message}")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("quetzald answered {status} with something unexpected: {message}")]
    Unexpected { status: StatusCode, message: String },
}

/// Where the daemon is.
#[derive(Clone, Debug)]
pub enum Target {
    Unix(PathBuf),
    Tcp {
        authority: String,
        token: String,
    },
    /// A `QUETZAL_URL` that is not `https://`.
    Unsupported(String),
}

impl std::fmt::Display for Target {
    /// Where, never with the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(path) => write!(f, "{}", path.display()),
            Target::Tcp { authority, .. } => write!(f, "https://{authority}"),
            Target::Unsupported(url) => f.write_str(url),
        }
    }
}

/// A bidirectional byte stream to the daemon.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

#[derive(Clone, Debug)]
pub struct Client {
    target: Target,
}

impl Client {
    /// `QUETZAL_URL=https://HOST:PORT` (token from `QUETZAL_TOKEN` or the
    /// data directory), else the Unix socket in the data directory.
    pub fn from_env() -> Self {
        let data = crate::data_dir();
        let target = match std::env::var("QUETZAL_URL") {
            Ok(url) if !url.is_empty() && !url.starts_with("https://") => Target::Unsupported(url),
            Ok(url) if !url.is_empty() => Target::Tcp {
                authority: url
                    .trim_start_matches("https://")
                    .trim_end_matches('/')
                    .to_owned(),
                token: std::env::var("QUETZAL_TOKEN").unwrap_or_else(|_| {
                    std::fs::read_to_string(quetzal_node::token::path(&data))
                        .unwrap_or_default()
                        .trim()
                        .to_owned()
                }),
            },
            _ => Target::Unix(quetzal_node::socket_path(&data)),
        };
        Client { target }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Opens a new connection.
    pub async fn connect(&self) -> Result<Box<dyn Stream>, ClientError> {
        match &self.target {
            Target::Unix(path) => tokio::net::UnixStream::connect(path)
                .await
                .map(|s| Box::new(s) as Box<dyn Stream>)
                .map_err(|_| ClientError::NotRunning {
                    path: path.display().to_string(),
                }),
            Target::Tcp { authority, .. } => {
                let pin = crate::trust::pinned(authority).map_err(|message| {
                    ClientError::Connect {
                        target: authority.clone(),
                        message,
                    }
                })?;
                let (verifier, result) = tls(authority, pin.clone()).await?;
                let err = match result {
                    Ok(stream) => return Ok(stream),
                    Err(err) => err,
                };
                match (pin, verifier.seen()) {
                    (Some(pinned), Some(seen)) if pinned != seen => Err(ClientError::Mismatch {
                        authority: authority.clone(),
                        seen,
                        pinned,
                    }),
                    (None, Some(seen)) => match crate::trust::ask_first_use(authority, &seen) {
                        Some(Ok(true)) => tls(authority, Some(seen)).await?.1,
                        Some(Ok(false)) => Err(ClientError::Connect {
                            target: authority.clone(),
                            message: "its certificate was not trusted".into(),
                        }),
                        Some(Err(message)) => Err(ClientError::Connect {
                            target: authority.clone(),
                            message,
                        }),
                        None => Err(ClientError::Untrusted {
                            authority: authority.clone(),
                            seen,
                        }),
                    },
                    _ => Err(err),
                }
            }
            Target::Unsupported(url) => Err(ClientError::Connect {
                target: url.clone(),
                message: "quetzald's TCP listener speaks HTTPS only: QUETZAL_URL must be https://HOST:PORT".into(),
            }),
        }
    }

    fn request_for(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Request<Full<Bytes>> {
        let body = body.map(|body| ("application/json", Bytes::from(body.to_string())));
        self.raw_request_for(method, path, body)
    }

    fn raw_request_for(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Bytes)>,
    ) -> Request<Full<Bytes>> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost");
        if let Target::Tcp { token, .. } = &self.target {
            builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let bytes = match body {
            Some((content_type, bytes)) => {
                builder = builder.header(hyper::header::CONTENT_TYPE, content_type);
                bytes
            }
            None => Bytes::new(),
        };
        builder
            .body(Full::new(bytes))
            .expect("a request from a method, a path and fixed headers is valid")
    }

    /// Sends a request and returns the response once its head arrived.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let request = self.request_for(method, path, body);
        self.send_request(request).await
    }

    /// Sends raw bytes (`PUT` a file) or nothing, and reads the whole
    /// answer's body as bytes; the API's error otherwise.
    pub async fn transfer(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        let body = body.map(|bytes| ("application/octet-stream", Bytes::from(bytes)));
        self.exchange(self.raw_request_for(method, path, body))
            .await
    }

    /// Sends a request and reads the whole answer: a 2xx answer's body,
    /// or the API's error.
    async fn exchange(&self, request: Request<Full<Bytes>>) -> Result<Bytes, ClientError> {
        let response = self.send_request(request).await?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|err| ClientError::Unexpected {
                status,
                message: err.to_string(),
            })?
            .to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        Err(error_of(status, &bytes))
    }

    async fn send_request(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream = self.connect().await?;
        let broken = |err: hyper::Error| ClientError::Connect {
            target: self.target.to_string(),
            message: err.to_string(),
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(broken)?;
        tokio::spawn(connection);
        sender.send_request(request).await.map_err(broken)
    }

    /// Sends a request; a 2xx answer's JSON body (null when empty) or the
    /// API's error.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let bytes = self.exchange(self.request_for(method, path, body)).await?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|err| ClientError::Unexpected {
            status: StatusCode::OK,
            message: err.to_string(),
        })
    }

    /// [`Client::call`], typed.
    pub async fn call_as<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, ClientError> {
        let value = self.call(method, path, body).await?;
        serde_json::from_value(value).map_err(|err| ClientError::Unexpected {
            status: StatusCode::OK,
            message: err.to_string(),
        })
    }
}

/// The API's error in an answer's body.
fn error_of(status: StatusCode, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => ClientError::Api {
            status,
            code: body.error.code,
            message: body.error.message,
        },
        Err(_) => ClientError::Unexpected {
            status,
            message: String::from_utf8_lossy(bytes).chars().take(200).collect(),
        },
    }
}

/// A TLS connection to `authority` that accepts the certificate whose
/// fingerprint is `pin`; with the verifier, which says what the server
/// presented.
async fn tls(
    authority: &str,
    pin: Option<String>,
) -> Result<
    (
        Arc<quetzal_node::tls::Pinned>,
        Result<Box<dyn Stream>, ClientError>,
    ),
    ClientError,
> {
    let unreachable = |message: String| ClientError::Connect {
        target: authority.to_owned(),
        message,
    };
    let tcp = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|err| unreachable(err.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let (verifier, config) = quetzal_node::tls::pinned_client(pin);
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|err| unreachable(format!("'{host}' is not a host name: {err}")))?;
    let result = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map(|stream| Box::new(stream) as Box<dyn Stream>)
        .map_err(|err| unreachable(format!("TLS: {err}")));
    Ok((verifier, result))
}

/// Percent-encodes a query value.
pub fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}
