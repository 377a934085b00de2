//! The event log: the only source of truth.
//!
//! The log is a gapless sequence of segment objects `{prefix}/log/{position:020}.ndjson`, each
//! written once with put-if-absent and never changed. A position becomes visible only when its
//! whole segment is stored, so a reader that asks for `position + 1` until it exists sees every
//! event exactly once, in commit order, at the cost of one GET per poll. The same code serves S3
//! and local disk through `object_store`.

mod pipeline;
pub mod plan;
pub mod segment;
pub mod tail;
pub mod writer;

pub use segment::Segment;

use crate::config::{LogConfig, LogLocation};
use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig};
use std::time::Duration;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Log failures. `AlreadyExists` is the put-if-absent fence that the commit protocol relies on.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log position {0} is already written")]
    AlreadyExists(u64),
    #[error("event log store: {0}")]
    Store(#[from] object_store::Error),
    #[error("event log is corrupt: {0}")]
    Corrupt(#[from] segment::DecodeError),
    #[error("event log setup: {0}")]
    Setup(String),
    #[error("event log local disk: {0}")]
    Io(#[from] std::io::Error),
}

/// Requests made to the store, by kind, for cost accounting (metrics, benchmarks, tests).
#[derive(Debug, Default)]
pub struct RequestCounts {
    pub puts: AtomicU64,
    pub gets: AtomicU64,
    pub lists: AtomicU64,
}

impl RequestCounts {
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.puts.load(Ordering::Relaxed),
            self.gets.load(Ordering::Relaxed),
            self.lists.load(Ordering::Relaxed),
        )
    }
}

/// Handle to the event log's segment objects.
#[derive(Debug, Clone)]
pub struct EventLog {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// Set for the local-disk backend, whose writes are fsynced before they are acknowledged.
    local_root: Option<PathBuf>,
    counts: Arc<RequestCounts>,
}

/// The extra CA certificates of `log.s3.ca_file` (a PEM bundle), trusted beside the system's;
/// none when the key is empty.
fn ca_bundle(path: &str) -> Result<Vec<object_store::Certificate>, LogError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let pem = std::fs::read(path).map_err(|e| LogError::Setup(format!("log.s3.ca_file {path}: {e}")))?;
    let bundle = object_store::Certificate::from_pem_bundle(&pem)
        .map_err(|e| LogError::Setup(format!("log.s3.ca_file {path}: not a PEM certificate bundle: {e}")))?;
    if bundle.is_empty() {
        return Err(LogError::Setup(format!("log.s3.ca_file {path}: holds no certificate")));
    }
    Ok(bundle)
}

impl EventLog {
    pub fn open(config: &LogConfig) -> Result<EventLog, LogError> {
        match LogLocation::parse(&config.url).map_err(|e| LogError::Setup(e.to_string()))? {
            LogLocation::S3 { bucket, prefix } => {
                // object_store's HTTP client takes the process's rustls provider; spiced has
                // ring alone. Installed once; later calls find it there.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let s3 = &config.s3;
                let retry = RetryConfig {
                    max_retries: s3.max_retries,
                    retry_timeout: Duration::from_millis(s3.retry_timeout_ms),
                    ..Default::default()
                };
                let mut client = ClientOptions::new()
                    .with_timeout(Duration::from_millis(s3.request_timeout_ms))
                    .with_connect_timeout(Duration::from_secs(5));
                for certificate in ca_bundle(&s3.ca_file)? {
                    client = client.with_root_certificate(certificate);
                }
                let mut builder = AmazonS3Builder::from_env()
                    .with_retry(retry)
                    .with_client_options(client)
                    .with_bucket_name(bucket)
                    .with_region(&s3.region)
                    .with_allow_http(s3.allow_http)
                    .with_virtual_hosted_style_request(!s3.path_style);
                if !s3.endpoint.is_empty() {
                    builder = builder.with_endpoint(&s3.endpoint);
                }
                if !s3.access_key_id.is_empty() {
                    builder = builder.with_access_key_id(&s3.access_key_id);
                }
                if !s3.secret_access_key.is_empty() {
                    builder = builder.with_secret_access_key(s3.secret_access_key.expose());
                }
                Ok(Self::from_store(Arc::new(builder.build()?), &prefix, None))
            }
            LogLocation::Local { dir } => {
                std::fs::create_dir_all(&dir)?;
                let root = dir.canonicalize()?;
                let store = LocalFileSystem::new_with_prefix(&root)?;
                Ok(Self::from_store(Arc::new(store), "", Some(root)))
            }
        }
    }

    /// A log over any object store (tests use the in-memory one).
    pub fn from_store(store: Arc<dyn ObjectStore>, prefix: &str, local_root: Option<PathBuf>) -> Self {
        EventLog {
            store,
            prefix: ObjectPath::from(prefix),
            local_root,
            counts: Arc::default(),
        }
    }

    pub fn segment_path(&self, position: u64) -> ObjectPath {
        let key = format!("log/{position:020}.ndjson");
        if self.prefix.as_ref().is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    pub fn counts(&self) -> &RequestCounts {
        &self.counts
    }

    fn count(&self, kind: &'static str) {
        let counter = match kind {
            "put" => &self.counts.puts,
            "get" => &self.counts.gets,
            _ => &self.counts.lists,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("spiced_s3_requests_total", "kind" => kind).increment(1);
    }

    /// Counts a failed request (not an absent object, nor the put-if-absent fence: the
    /// protocol expects those) and passes its error on.
    fn failed(kind: &'static str, e: object_store::Error) -> LogError {
        metrics::counter!("spiced_s3_errors_total", "kind" => kind).increment(1);
        e.into()
    }

    /// Counts this handle's requests into `counts` (shared with whoever reports them).
    pub fn with_counts(mut self, counts: Arc<RequestCounts>) -> Self {
        self.counts = counts;
        self
    }

    /// Writes a segment with put-if-absent. `AlreadyExists` means another writer (or an earlier
    /// crashed attempt) owns this position; the caller must repair, never overwrite.
    pub async fn put_segment(&self, position: u64, body: Bytes) -> Result<(), LogError> {
        let path = self.segment_path(position);
        self.count("put");
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.store.put_opts(&path, PutPayload::from(body), opts).await {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                return Err(LogError::AlreadyExists(position))
            }
            Err(e) => return Err(Self::failed("put", e)),
        }
        if let Some(root) = &self.local_root {
            sync_local(root, path.as_ref()).await?;
        }
        Ok(())
    }

    /// Reads the segment at `position`, or `None` if that position is not written yet.
    pub async fn get_segment(&self, position: u64) -> Result<Option<Segment>, LogError> {
        let path = self.segment_path(position);
        self.count("get");
        let raw = match self.store.get(&path).await {
            Ok(result) => result.bytes().await.map_err(|e| Self::failed("get", e))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(Self::failed("get", e)),
        };
        Ok(Some(Segment::decode(position, raw)?))
    }

    /// Every written position, by listing the log (for `spiced verify` only: the write and
    /// read paths never list).
    pub async fn list_positions(&self) -> Result<Vec<u64>, LogError> {
        use futures::TryStreamExt;
        self.count("list");
        let prefix = if self.prefix.as_ref().is_empty() {
            ObjectPath::from("log")
        } else {
            ObjectPath::from(format!("{}/log", self.prefix))
        };
        let metas: Vec<_> = self.store.list(Some(&prefix)).try_collect().await.map_err(|e| Self::failed("list", e))?;
        let mut positions: Vec<u64> = metas
            .iter()
            .filter_map(|m| m.location.filename()?.strip_suffix(".ndjson")?.parse().ok())
            .collect();
        positions.sort_unstable();
        Ok(positions)
    }

    /// Cheap reachability check for readiness probes: a HEAD of position 1 (absent is fine).
    pub async fn ping(&self) -> Result<(), LogError> {
        self.count("get");
        match self.store.head(&self.segment_path(1)).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Self::failed("get", e)),
        }
    }
}

/// `object_store`'s local backend renames a temp file into place but does not fsync; a 202
/// must survive power loss, so sync the file and its directory here.
async fn sync_local(root: &std::path::Path, key: &str) -> Result<(), LogError> {
    let file = root.join(key);
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        std::fs::File::open(&file)?.sync_all()?;
        if let Some(dir) = file.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })
    .await
    .map_err(|e| LogError::Setup(format!("fsync task failed: {e}")))??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations() {
        assert_eq!(
            LogLocation::parse("s3://b/p/q/").unwrap(),
            LogLocation::S3 { bucket: "b".into(), prefix: "p/q".into() }
        );
        assert_eq!(
            LogLocation::parse("s3://b").unwrap(),
            LogLocation::S3 { bucket: "b".into(), prefix: "".into() }
        );
        assert_eq!(
            LogLocation::parse("file:///var/x").unwrap(),
            LogLocation::Local { dir: "/var/x".into() }
        );
        assert_eq!(LogLocation::parse("./data").unwrap(), LogLocation::Local { dir: "./data".into() });
        assert!(LogLocation::parse("gs://x").is_err());
        assert!(LogLocation::parse("s3://").is_err());
    }

    #[test]
    fn segment_keys_sort_by_position() {
        let log = EventLog::from_store(Arc::new(object_store::memory::InMemory::new()), "p", None);
        assert_eq!(log.segment_path(42).as_ref(), "p/log/00000000000000000042.ndjson");
        assert!(log.segment_path(9).as_ref() < log.segment_path(10).as_ref());
    }

    #[tokio::test]
    async fn put_is_create_only() {
        let log = EventLog::from_store(Arc::new(object_store::memory::InMemory::new()), "", None);
        log.put_segment(1, Bytes::from_static(b"")).await.unwrap();
        assert!(matches!(
            log.put_segment(1, Bytes::from_static(b"")).await,
            Err(LogError::AlreadyExists(1))
        ));
        assert!(log.get_segment(2).await.unwrap().is_none());
    }
}
