//! Test harness: the real `collab` binary as a child process and WebSocket clients that hold real
//! yrs documents and behave like the y-websocket client.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

mod client;
pub use client::*;

pub type ClientRequest = tokio_tungstenite::tungstenite::handshake::client::Request;

/// An upgrade the server refused: its HTTP status and plain-text body.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}: {}", self.status, self.body)
    }
}

impl From<tokio_tungstenite::tungstenite::Error> for Refused {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        match e {
            tokio_tungstenite::tungstenite::Error::Http(res) => Refused {
                status: res.status().as_u16(),
                body: res
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            },
            other => Refused {
                status: 0,
                body: other.to_string(),
            },
        }
    }
}

/// A WebSocket request for `url` with extra headers.
pub fn request(url: &str, headers: &[(&str, &str)]) -> ClientRequest {
    let mut req = url.into_client_request().expect("url");
    for (k, v) in headers {
        req.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    req
}

/// A WebSocket upgrade request sent by hand, so a refusal's body can be read in full:
/// (status, body).
pub fn raw_upgrade(addr: SocketAddr, path_and_query: &str) -> (u16, String) {
    http(
        addr,
        "GET",
        path_and_query,
        &[
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        b"",
    )
}

/// A minimal HTTP/1.1 request over a fresh connection: (status, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
    {
        head.push_str("Connection: close\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
use yrs::encoding::read::Cursor;
use yrs::sync::awareness::{Awareness, AwarenessUpdate, AwarenessUpdateEntry};
use yrs::sync::protocol::{Message, MessageReader, SyncMessage};
use yrs::updates::decoder::{Decode, DecoderV1};
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, IdSet, ReadTxn, Text, Transact, Update, ID};

pub const WAIT: Duration = Duration::from_secs(10);

/// A metric without labels from the server's /metrics (0 when absent).
pub fn metric(server: &Server, name: &str) -> f64 {
    let (_, body) = http(server.addr, "GET", "/metrics", &[], b"");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Path of the `collab` binary: `COLLAB_BIN`, else the one built next to this test executable.
pub fn collab_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("COLLAB_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(format!("collab{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build -p collab-server --bin collab)",
        bin.display()
    );
    bin
}

pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub data: tempfile::TempDir,
    pub args: Vec<String>,
    env: Vec<(String, String)>,
    log_path: PathBuf,
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        Self::start_with_nofile(args, None)
    }

    /// Starts with the open-file limit (soft and hard) set to `nofile`, like `ulimit -n`.
    pub fn start_with_nofile(args: &[&str], nofile: Option<u64>) -> Server {
        Self::start_full(args, &[], nofile)
    }

    /// Starts with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_full(args, env, None)
    }

    fn start_full(args: &[&str], env: &[(&str, &str)], nofile: Option<u64>) -> Server {
        let data = tempfile::tempdir().expect("temp dir");
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let log_path = data.path().join("server.log");
        let (child, addr) = spawn(
            &data.path().join("db"),
            "127.0.0.1:0",
            &args,
            &env,
            &log_path,
            nofile,
        );
        Server {
            child: Some(child),
            addr,
            data,
            args,
            env,
            log_path,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// Resident memory of the server process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }

    /// Whether the server process still has a socket open for the TCP connection whose
    /// client side is `client_port` (read from /proc, as the kernel sees it).
    pub fn holds_connection(&self, client_port: u16) -> bool {
        let mut inodes = std::collections::HashSet::new();
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let Ok(text) = std::fs::read_to_string(table) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                let (local, remote, inode) = (cols[1], cols[2], cols[9]);
                let port_of = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).ok();
                if port_of(local) == Some(self.addr.port()) && port_of(remote) == Some(client_port)
                {
                    inodes.insert(format!("socket:[{inode}]"));
                }
            }
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{}/fd", self.pid())) else {
            return false;
        };
        fds.filter_map(Result::ok).any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| inodes.contains(target.to_string_lossy().as_ref()))
        })
    }

    pub fn url(&self, doc: &str) -> String {
        format!("ws://{}/{}", self.addr, doc)
    }

    pub fn db_path(&self) -> PathBuf {
        self.data.path().join("db")
    }

    /// SIGTERM; asserts a clean exit.
    pub fn terminate(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        self.terminate_wait();
    }

    /// Waits for a server that was sent SIGTERM to exit; asserts a clean exit.
    pub fn terminate_wait(&mut self) {
        let mut child = self.child.take().expect("server running");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                assert!(st.success(), "server exited with {st} after SIGTERM");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("server running");
        child.kill().expect("kill -9");
        child.wait().expect("wait");
    }

    /// Starts again on the same data folder (and a new port).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the server first");
        let (child, addr) = spawn(
            &self.db_path(),
            "127.0.0.1:0",
            &self.args,
            &self.env,
            &self.log_path,
            None,
        );
        self.child = Some(child);
        self.addr = addr;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().expect("wait").is_none())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(
    db: &Path,
    addr: &str,
    args: &[String],
    env: &[(String, String)],
    log: &Path,
    nofile: Option<u64>,
) -> (Child, SocketAddr) {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let mut cmd = Command::new(collab_bin());
    if let Some(n) = nofile {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe and touches nothing of the parent.
        unsafe {
            cmd.pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, n, n));
        }
    }
    let mut child = cmd
        .arg("--addr")
        .arg(addr)
        .arg("--data-dir")
        .arg(db)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .expect("start collab");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("listening on ") {
                let _ = tx.send(a.trim().parse::<SocketAddr>().expect("address"));
            }
        }
    });
    let addr = rx
        .recv_timeout(WAIT)
        .expect("server did not print its address");
    (child, addr)
}

pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Connects and waits for the first sync.
pub async fn synced_client(url: &str) -> Client {
    let c = Client::connect(url).await;
    c.wait_synced().await;
    c
}
