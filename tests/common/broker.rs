//! A private Kafka-protocol broker (the pinned tansu binary) for one test, so the test can
//! pause it (SIGSTOP) and resume it (SIGCONT) without touching the broker every other test
//! shares.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Broker {
    /// `host:port` for `kafka.brokers`.
    pub addr: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Broker {
    /// Starts a broker with in-memory storage on a free port and waits until it accepts
    /// connections.
    pub async fn start() -> Broker {
        let port = super::process::free_port();
        Self::start_advertising(port, &format!("127.0.0.1:{port}")).await
    }

    /// A broker listening on `port` that tells clients to connect to `advertised` (a TLS
    /// proxy in front of it, say). `addr` is where the broker itself listens.
    pub async fn start_advertising(port: u16, advertised: &str) -> Broker {
        Self::start_with(port, advertised, &[]).await
    }

    /// A broker on `port` advertising `advertised`, with extra tansu arguments
    /// (`--authentication`, say).
    pub async fn start_with(port: u16, advertised: &str, extra: &[&str]) -> Broker {
        let bin = std::env::var("SPICED_TEST_TANSU_BIN")
            .expect("SPICED_TEST_TANSU_BIN is not set: run the tests through scripts/test.sh");
        let addr = format!("127.0.0.1:{port}");
        let url = format!("tcp://{addr}");
        let advertised = format!("tcp://{advertised}");
        // tansu reads a .env file from its working directory: give it an empty one of its own.
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &advertised])
            .args(["--storage-engine", "memory://tansu/"])
            .args(extra)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        let broker = Broker { addr, child, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(&broker.addr).await.is_err() {
            assert!(Instant::now() < deadline, "private broker did not listen on {} within 30 s", broker.addr);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        broker
    }

    fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} broker");
    }

    /// Freezes the broker: connections stay open and nothing answers, as a stalled broker.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    pub fn resume(&self) {
        self.signal("CONT");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // A stopped process must be continued to die promptly on SIGKILL's reaping.
        let _ = Command::new("kill").args(["-CONT", &self.child.id().to_string()]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
