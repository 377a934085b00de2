//! TLS for the tests: a throw-away CA with a server certificate for 127.0.0.1 and localhost
//! (made with the `openssl` command), and stunnel terminating TLS in front of a plain server.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A CA and one server certificate it signed, in a temporary directory.
pub struct TestCa {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    dir: tempfile::TempDir,
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("the openssl command");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl TestCa {
    pub fn new() -> TestCa {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        openssl(d, &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=spiced test CA"]);
        openssl(d, &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]);
        std::fs::write(d.join("ext.cnf"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
        openssl(d, &["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf"]);
        TestCa { ca: d.join("ca.pem"), cert: d.join("server.pem"), key: d.join("server.key"), dir }
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// stunnel accepting TLS on a free port of 127.0.0.1 and forwarding plain TCP to `upstream`.
pub struct Stunnel {
    pub port: u16,
    child: Child,
}

impl Stunnel {
    pub async fn start(ca: &TestCa, port: u16, upstream: &str) -> Stunnel {
        let conf = ca.dir().join(format!("stunnel-{port}.conf"));
        let text = format!(
            "foreground = yes\npid =\n[tls]\naccept = 127.0.0.1:{port}\nconnect = {upstream}\ncert = {}\nkey = {}\n",
            ca.cert.display(),
            ca.key.display()
        );
        std::fs::write(&conf, text).unwrap();
        let bin = if std::path::Path::new("/usr/bin/stunnel4").exists() { "stunnel4" } else { "stunnel" };
        let child = Command::new(bin)
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("stunnel (Debian's stunnel4; scripts/services.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(Instant::now() < deadline, "stunnel did not listen on {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Stunnel { port, child }
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
