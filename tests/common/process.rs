//! Running `spiced` as a separate process, for tests that kill it.

use spiced::config::Config;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

pub struct Spiced {
    pub child: Child,
}

impl Spiced {
    /// Starts `spiced <args> --config <file>` with `config` written to a file in `dir` and
    /// `env` added. The database URL goes through the environment, since the serialised config
    /// has its secrets redacted.
    pub fn spawn(args: &[&str], config: &Config, dir: &Path, env: &[(&str, String)]) -> Spiced {
        let mut cmd = command(args, config, dir);
        cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Spiced { child: cmd.spawn().expect("spawn spiced") }
    }

    /// As [`Spiced::spawn`], with the process's log (stderr) written to `log`.
    pub fn spawn_logging(args: &[&str], config: &Config, dir: &Path, env: &[(&str, String)], log: &Path) -> Spiced {
        let mut cmd = command(args, config, dir);
        cmd.stdout(Stdio::null()).stderr(std::fs::File::create(log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Spiced { child: cmd.spawn().expect("spawn spiced") }
    }

    /// Runs a tool (`spiced status`, `spiced project failures`, ...) to its end, for its output.
    pub fn output(args: &[&str], config: &Config, dir: &Path) -> std::process::Output {
        command(args, config, dir).env("SPICED_LOG", "warn").output().expect("run spiced")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (bounded) for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "spiced did not exit within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {}", self.pid());
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

/// `spiced <args> --config <file>`, with `config` written to a file in `dir`.
fn command(args: &[&str], config: &Config, dir: &Path) -> Command {
    let file = dir.join(format!("spiced-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, toml::to_string(config).unwrap()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spiced"));
    cmd.args(args)
        .arg("--config")
        .arg(&file)
        .env("SPICED_DATABASE__URL", config.database.url.expose());
    cmd
}

impl Drop for Spiced {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port on the loopback interface (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
