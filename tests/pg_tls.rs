//! TLS to PostgreSQL, as libpq's `sslmode` and `sslrootcert` say. The shared cluster runs with
//! `ssl = on` and Debian's self-signed certificate (encryption without verification); for
//! `verify-ca` and `verify-full` a private cluster is started with a certificate from a CA
//! made in the test, for 127.0.0.1 and localhost.

mod common;

use common::process::free_port;
use common::tls::TestCa;
use spiced::config::{Config, Secret};
use spiced::db::Database;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether the pool's connections are encrypted (`pg_stat_ssl`), through spiced's own pool.
async fn encrypted(url: &str) -> Result<bool, String> {
    let mut config = Config::dev();
    config.database.url = Secret::new(url);
    let db = Database::open(&config.database).await.map_err(|e| e.to_string())?;
    let client = db.postgres().unwrap().pool().get().await.map_err(|e| e.to_string())?;
    let row = client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

fn with(url: &str, query: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{query}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_decides_encryption_on_the_shared_cluster() {
    let url = std::env::var("SPICED_TEST_PG_URL").expect("run through scripts/test.sh");
    assert_eq!(encrypted(&with(&url, "sslmode=disable")).await, Ok(false));
    assert_eq!(encrypted(&with(&url, "sslmode=require")).await, Ok(true));
    assert_eq!(encrypted(&url).await, Ok(true), "prefer (the default) uses TLS when offered");
    let refused = encrypted(&with(&url, "sslmode=verify-full")).await;
    assert!(refused.is_err(), "a self-signed certificate no CA vouches for is refused: {refused:?}");
}

/// A throw-away PostgreSQL cluster with TLS from `ca`, on 127.0.0.1 and 127.0.0.2.
struct Cluster {
    data: PathBuf,
    bin: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

fn as_postgres(bin: &Path, args: &[&str]) {
    let out = Command::new("runuser").args(["-u", "postgres", "--"]).arg(bin).args(args).output().unwrap();
    assert!(out.status.success(), "{} {args:?}: {}", bin.display(), String::from_utf8_lossy(&out.stderr));
}

impl Cluster {
    fn start(ca: &TestCa) -> Cluster {
        let bin = std::fs::read_dir("/usr/lib/postgresql").unwrap().flatten().map(|e| e.path().join("bin")).max().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let chown = |p: &Path| assert!(Command::new("chown").args(["-R", "postgres:postgres"]).arg(p).status().unwrap().success());
        chown(dir.path());
        let data = dir.path().join("data");
        as_postgres(&bin.join("initdb"), &["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres", "--no-sync"]);
        std::fs::copy(&ca.cert, data.join("server.pem")).unwrap();
        std::fs::copy(&ca.key, data.join("server.key")).unwrap();
        chown(&data);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(data.join("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let port = free_port();
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1,127.0.0.2 -c ssl=on -c ssl_cert_file=server.pem -c ssl_key_file=server.key -c fsync=off",
            dir.path().display()
        );
        as_postgres(&bin.join("pg_ctl"), &["-D", data.to_str().unwrap(), "-o", &options, "-w", "-l", dir.path().join("log").to_str().unwrap(), "start"]);
        Cluster { data, bin, port, _dir: dir }
    }

    fn url(&self, host: &str, query: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{query}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_ca_and_verify_full_check_the_certificate() {
    let ca = TestCa::new();
    let other = TestCa::new();
    let cluster = Cluster::start(&ca);
    let root = format!("sslrootcert={}", ca.ca.display());
    let wrong = format!("sslrootcert={}", other.ca.display());
    // Issued for 127.0.0.1 and localhost by the CA we trust: both checks pass.
    for host in ["localhost", "127.0.0.1"] {
        assert_eq!(encrypted(&cluster.url(host, &format!("sslmode=verify-full&{root}"))).await, Ok(true), "{host}");
    }
    // 127.0.0.2 is the same server, but not a name the certificate is for.
    assert_eq!(encrypted(&cluster.url("127.0.0.2", &format!("sslmode=verify-ca&{root}"))).await, Ok(true));
    let mismatch = encrypted(&cluster.url("127.0.0.2", &format!("sslmode=verify-full&{root}"))).await;
    assert!(mismatch.is_err(), "verify-full checks the host name: {mismatch:?}");
    // Signed by a CA we do not trust.
    let untrusted = encrypted(&cluster.url("localhost", &format!("sslmode=verify-ca&{wrong}"))).await;
    assert!(untrusted.is_err(), "verify-ca checks the chain: {untrusted:?}");
    // require with a root certificate checks the chain too, as libpq does.
    assert!(encrypted(&cluster.url("localhost", &format!("sslmode=require&{wrong}"))).await.is_err());
    // And spiced itself runs over it: migrations and the index.
    let mut config = Config::dev();
    config.database.url = Secret::new(cluster.url("localhost", &format!("sslmode=verify-full&{root}")));
    let db = Database::open(&config.database).await.unwrap();
    db.migrate().await.unwrap();
    assert_eq!(db.index.head().await.unwrap(), 0);
}
