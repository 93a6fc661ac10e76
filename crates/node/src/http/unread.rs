//! An answer given before the request's body was read says
//! `Connection: close`.
//!
//! hyper cannot reuse a connection whose request body is still arriving
//! (a 401, a 415, a 404 given before the body was read): it closes it
//! after the answer. Without a `Connection: close` in that answer a
//! client with a pool sends its next request on the closed connection and
//! fails (seen as a TLS EOF in the API fuzzer whenever the body came in a
//! later packet than the head). With it, the client opens a new one.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use hyper::body::{Body as _, Frame, SizeHint};

/// Runs `next`; marks its answer `Connection: close` when the request had
/// a body that was not read to its end.
pub async fn close_if_unread(request: Request, next: Next) -> Response {
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let ended = Arc::new(AtomicBool::new(false));
    let request = request.map(|inner| {
        Body::new(Watched {
            inner,
            ended: ended.clone(),
        })
    });
    let mut response = next.run(request).await;
    if !ended.load(Ordering::Acquire) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A request body that notes when it was read to its end.
struct Watched {
    inner: Body,
    ended: Arc<AtomicBool>,
}

impl hyper::body::Body for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.ended.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::routing::post;
    use tower::ServiceExt;

    use super::*;

    async fn answer(app: Router, body: &'static str) -> Option<HeaderValue> {
        let request = axum::http::Request::post("/")
            .header(header::CONTENT_LENGTH, body.len())
            .body(Body::from(body))
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        response.headers().get(header::CONNECTION).cloned()
    }

    fn app(handler: axum::routing::MethodRouter) -> Router {
        Router::new()
            .route("/", handler)
            .layer(axum::middleware::from_fn(close_if_unread))
    }

    #[tokio::test]
    async fn an_answer_before_the_body_was_read_closes_the_connection() {
        let refused = app(post(|| async { axum::http::StatusCode::UNAUTHORIZED }));

        assert_eq!(answer(refused, "{}").await.unwrap(), "close");
    }

    #[tokio::test]
    async fn an_answer_after_the_whole_body_keeps_it() {
        let read = app(post(|body: String| async move { body }));
        let empty = app(post(|| async { "" }));

        assert_eq!(answer(read, "{\"name\":\"x\"}").await, None);
        assert_eq!(answer(empty, "").await, None);
    }
}
