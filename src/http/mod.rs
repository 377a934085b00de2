//! The HTTP server under the API (`serve`) and every role's operations endpoints: plain or TLS connections, each
//! bounded.
//!
//! `axum::serve` has no header read timeout, connection limit or TLS, so connections are
//! accepted here and handed to hyper with the bounds set:
//! - at most `max_connections` are open; one more gets a 503 with `Retry-After` and is closed,
//!   rather than queueing in the kernel's backlog without bound;
//! - a client has `header_read_timeout` to send a request's head (and the TLS handshake), and an
//!   idle keep-alive connection is closed after as long: a client that sends half a request
//!   line holds its connection for no longer.
//!
//! The time a request may take once its head is in is bounded by the router's request timeout
//! (`serve.request_timeout_ms`, a layer of the API's router), not here.

pub mod tls;

use tls::ServerTls;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The bounds of one listener.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// What the 503 of a refused connection asks the client to wait, in seconds.
    pub retry_after_secs: u64,
    /// After `shutdown`, how long open requests may take before their connections are dropped.
    pub grace: Duration,
}

/// Serves `app` on `listener` until `shutdown`, then lets open requests finish for
/// `limits.grace` and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<ServerTls>,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    // Fires at the end of the grace period: connections still open are dropped, with the
    // requests on them, so nothing they hold (a writer handle) outlives the server.
    let deadline = CancellationToken::new();
    let limits = Arc::new(limits);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and the like pass; spinning on them would only burn the CPU
                    // the open connections need to finish.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let (tls, limits) = (tls.clone(), limits.clone());
        let ends = Ends { graceful: shutdown.clone(), deadline: deadline.clone() };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => connections.spawn(connection(stream, app.clone(), tls, limits, ends, permit)),
            Err(_) => connections.spawn(refuse(stream, tls, limits)),
        };
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(limits.grace, connections.wait()).await.is_err() {
        tracing::warn!(grace = ?limits.grace, "grace period over; closing the remaining connections");
        deadline.cancel();
        connections.wait().await;
    }
    Ok(())
}

/// How a connection ends when the server stops: `graceful` finishes the request in progress,
/// `deadline` drops it.
#[derive(Clone)]
struct Ends {
    graceful: CancellationToken,
    deadline: CancellationToken,
}

/// One accepted connection, holding its permit until it closes.
async fn connection(
    stream: TcpStream,
    app: Router,
    tls: Option<ServerTls>,
    limits: Arc<Limits>,
    ends: Ends,
    _permit: OwnedSemaphorePermit,
) {
    match tls {
        None => serve_http(stream, app, &limits, ends).await,
        Some(tls) => match tokio::time::timeout(limits.header_read_timeout, tls.acceptor().accept(stream)).await {
            Ok(Ok(stream)) => serve_http(stream, app, &limits, ends).await,
            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!("TLS handshake timed out"),
        },
    }
}

async fn serve_http<S>(stream: S, app: Router, limits: &Limits, ends: Ends)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    let mut conn = std::pin::pin!(conn);
    let served = tokio::select! {
        served = conn.as_mut() => served,
        _ = ends.graceful.cancelled() => {
            // Finish the request in progress, then close; an idle connection closes now.
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                served = conn.as_mut() => served,
                _ = ends.deadline.cancelled() => return,
            }
        }
    };
    if let Err(e) = served {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// A connection past `max_connections`: told 503 and closed, within a bounded time.
async fn refuse(stream: TcpStream, tls: Option<ServerTls>, limits: Arc<Limits>) {
    metrics::counter!("spiced_http_connections_refused_total").increment(1);
    let answer = refusal(limits.retry_after_secs);
    let bounded = tokio::time::timeout(Duration::from_secs(2), async move {
        match tls {
            None => write_and_close(stream, &answer).await,
            Some(tls) => {
                let stream = tls.acceptor().accept(stream).await?;
                write_and_close(stream, &answer).await
            }
        }
    });
    let _ = bounded.await;
}

async fn write_and_close<S: AsyncWrite + Unpin>(mut stream: S, answer: &[u8]) -> std::io::Result<()> {
    stream.write_all(answer).await?;
    stream.shutdown().await
}

/// The whole HTTP/1.1 answer to a refused connection, in the API's error shape.
fn refusal(retry_after_secs: u64) -> Vec<u8> {
    let body = serde_json::json!({
        "error": "unavailable",
        "message": "too many open connections (serve.max_connections); retry later",
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: {retry_after_secs}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_refusal_is_one_complete_http_answer() {
        let answer = String::from_utf8(super::refusal(3)).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains("retry-after: 3"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"], "unavailable");
    }
}
