//! A real `redis-server` per test, on a free port, in a temporary folder, persisting like the
//! README asks (AOF on, `appendfsync always`).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

/// Whether redis-server is installed. Outside CI a missing server skips the cluster tests; in
/// CI (`CI` set) it is a failure, since `.ci/run` installs it.
pub fn redis_available() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-server is not installed (.ci/run installs it)"
        );
        eprintln!("SKIPPED: redis-server is not installed");
    }
    found
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Redis {
    pub fn start() -> Redis {
        let mut r = Redis {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", self.dir.path().to_str().unwrap()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(["--logfile", self.log_path().to_str().unwrap()])
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.connection().is_none() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn connection(&self) -> Option<redis::Connection> {
        redis::Client::open(self.url())
            .ok()?
            .get_connection_with_timeout(Duration::from_millis(200))
            .ok()
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c).ok().map(|_| c))
    }

    pub fn query<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        cmd.query(&mut self.connection().expect("redis answers"))
            .expect("redis command")
    }

    /// SIGKILL: whatever Redis acknowledged must be in its append-only file already.
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("redis running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM: Redis goes away (and writes nothing more) until `restart`.
    pub fn stop(&mut self) {
        let mut c = self.child.take().expect("redis running");
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        c.wait().unwrap();
    }

    /// Starts again on the same port and folder (so from the same append-only file).
    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        self.spawn();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
