//! A TCP proxy in front of a real service, that a test can take down and bring back, or pause
//! and resume: the dependency fails for real (connections refused and cut) or stalls for real
//! (connections open, nothing answers), without touching the shared server.

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

pub struct Proxy {
    pub addr: SocketAddr,
    upstream: String,
    inner: Arc<Mutex<Option<JoinHandle<()>>>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    paused: watch::Sender<bool>,
}

impl Proxy {
    /// A proxy in front of the config's S3 server, which the config then uses, with one quick
    /// retry so that a failure reaches the writer within about a second.
    pub async fn before_s3(config: &mut spiced::config::Config) -> Proxy {
        let upstream = config.log.s3.endpoint.trim_start_matches("http://").to_string();
        let proxy = Proxy::start(&upstream).await;
        config.log.s3.endpoint = format!("http://{}", proxy.addr);
        config.log.s3.max_retries = 1;
        config.log.s3.retry_timeout_ms = 1000;
        proxy
    }

    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = Proxy {
            addr,
            upstream: upstream.to_string(),
            inner: Arc::default(),
            connections: Arc::default(),
            paused: watch::channel(false).0,
        };
        proxy.serve(listener).await;
        proxy
    }

    async fn serve(&self, listener: TcpListener) {
        let upstream = self.upstream.clone();
        let connections = self.connections.clone();
        let paused = self.paused.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let paused = paused.subscribe();
                let conn = tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        tokio::join!(pump(cr, sw, paused.clone()), pump(sr, cw, paused));
                    }
                });
                connections.lock().await.push(conn);
            }
        });
        *self.inner.lock().await = Some(accept);
    }

    /// Refuses new connections and cuts the open ones.
    pub async fn down(&self) {
        if let Some(accept) = self.inner.lock().await.take() {
            accept.abort();
            let _ = accept.await;
        }
        for conn in self.connections.lock().await.drain(..) {
            conn.abort();
        }
    }

    /// Listens again on the same address.
    pub async fn up(&self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener).await;
    }

    /// Stops forwarding bytes either way; connections stay open and new ones are accepted, so
    /// the service looks frozen rather than gone.
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// Forwards again, what was held back first.
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }
}

/// Copies `from` to `to`, holding each chunk while the proxy is paused.
async fn pump(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin, mut paused: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if paused.wait_for(|p| !*p).await.is_err() {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
