//! The server under test: started from `--server-cmd` (and stopped afterwards) or attached to by
//! `--server-pid`; its CPU seconds and RSS read from /proc.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Shell command that starts the server; `{port}` becomes a free port and `{dir}` a fresh
    /// temporary folder (removed afterwards). It is run as `sh -c "exec CMD"`, so the started
    /// process must be the server itself (use `env VAR=x node …`, not `npx`). The generator waits
    /// until the port accepts connections and sends SIGTERM at the end.
    #[arg(long, conflicts_with_all = ["server_pid", "url"])]
    pub server_cmd: Option<String>,

    /// PID of an already running server (with --url).
    #[arg(long, requires = "url")]
    pub server_pid: Option<u32>,

    /// Base URL of an already running server, e.g. ws://127.0.0.1:1234
    #[arg(long)]
    pub url: Option<String>,

    /// Label of the server in the JSON line (e.g. collab, ref, ref-leveldb).
    #[arg(long, default_value = "server")]
    pub server_label: String,

    /// With --server-cmd: file that receives the server's stderr (default: inside {dir}).
    #[arg(long)]
    pub server_log: Option<PathBuf>,

    /// Wire dialect of the server: y-websocket (`y`), hocuspocus or y-sweet (y-websocket
    /// messages on y-sweet's URLs).
    #[arg(long, value_enum, default_value = "y")]
    pub protocol: crate::proto::Protocol,
}

pub struct Server {
    pub pid: u32,
    pub base_url: String,
    pub protocol: crate::proto::Protocol,
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
    log_path: Option<PathBuf>,
    clk_tck: f64,
    /// The command with `{port}` and `{dir}` filled in, kept for `restart`.
    cmd: Option<String>,
    port: u16,
}

#[derive(Serialize, Default, Debug, Clone)]
pub struct LogSummary {
    pub lines: usize,
    pub warn: usize,
    pub error: usize,
    pub first: Vec<String>,
}

#[derive(Serialize, Default, Debug, Clone)]
pub struct StopSummary {
    /// How the server exited after SIGTERM (only when the generator started it).
    pub exit: Option<String>,
    pub log: Option<LogSummary>,
    /// The server had already exited before the end of the run.
    pub died_during_run: bool,
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind a probe port")?;
    Ok(l.local_addr()?.port())
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

impl Server {
    pub fn start(args: &ServerArgs) -> anyhow::Result<Server> {
        let clk_tck = clk_tck();
        if let Some(cmd) = &args.server_cmd {
            let dir = tempfile::Builder::new()
                .prefix("collab-bench-")
                .tempdir()
                .context("temp dir")?;
            let port = free_port()?;
            let cmd = cmd
                .replace("{port}", &port.to_string())
                .replace("{dir}", &dir.path().display().to_string());
            let log_path = args
                .server_log
                .clone()
                .unwrap_or_else(|| dir.path().join("server.stderr"));
            std::fs::File::create(&log_path)
                .with_context(|| format!("create {}", log_path.display()))?;
            let child = spawn_listening(&cmd, &log_path, port)?;
            Ok(Server {
                pid: child.id(),
                base_url: format!("ws://127.0.0.1:{port}"),
                protocol: args.protocol,
                child: Some(child),
                dir: Some(dir),
                log_path: Some(log_path),
                clk_tck,
                cmd: Some(cmd),
                port,
            })
        } else {
            let (Some(pid), Some(url)) = (args.server_pid, &args.url) else {
                bail!("give --server-cmd, or --server-pid with --url");
            };
            Ok(Server {
                pid,
                base_url: url.trim_end_matches('/').to_string(),
                protocol: args.protocol,
                child: None,
                dir: None,
                log_path: None,
                clk_tck,
                cmd: None,
                port: 0,
            })
        }
    }

    /// URL of a document's connection. Hocuspocus routes by the name inside each message and
    /// ignores the path; the path names the document anyway, as HocuspocusProvider does not.
    pub fn url(&self, doc: &str) -> String {
        self.protocol.doc_url(&self.base_url, doc)
    }

    pub fn framing(&self, doc: &str) -> crate::proto::Framing {
        crate::proto::Framing::new(self.protocol, doc)
    }

    /// Bytes the server process caused to be written to storage (write_bytes of /proc/PID/io,
    /// counted when pages are dirtied, all threads included).
    pub fn io_write_bytes(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/io", self.pid)).ok()?;
        s.lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Total size of the files in `{dir}` (the server's data), when the generator made it.
    pub fn dir_bytes(&self) -> Option<u64> {
        fn walk(p: &std::path::Path) -> u64 {
            let Ok(rd) = std::fs::read_dir(p) else {
                return 0;
            };
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        }
        let d = self.dir.as_ref()?.path();
        // The stderr log may live there too; it is not the server's data.
        let log = self
            .log_path
            .as_ref()
            .filter(|l| l.starts_with(d))
            .and_then(|l| std::fs::metadata(l).ok())
            .map_or(0, |m| m.len());
        Some(walk(d).saturating_sub(log))
    }

    /// SIGTERM, wait for the exit, then start the same command on the same port and data
    /// folder and wait until it listens. Returns the seconds from spawn to listening.
    pub fn restart(&mut self) -> anyhow::Result<f64> {
        let (Some(cmd), Some(log)) = (self.cmd.clone(), self.log_path.clone()) else {
            bail!("restart needs a server started with --server-cmd");
        };
        if let Some(child) = self.child.take() {
            terminate(child);
        }
        let t = Instant::now();
        let child = spawn_listening(&cmd, &log, self.port)?;
        self.pid = child.id();
        self.child = Some(child);
        Ok(t.elapsed().as_secs_f64())
    }

    /// utime + stime of the whole process (all threads), in seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        proc_cpu_seconds(&format!("/proc/{}/stat", self.pid), self.clk_tck)
    }

    /// VmRSS in KiB.
    pub fn rss_kb(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    pub fn clk_tck(&self) -> f64 {
        self.clk_tck
    }

    pub fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => std::path::Path::new(&format!("/proc/{}", self.pid)).exists(),
        }
    }

    /// SIGTERM (only a server this generator started), then a summary of its stderr.
    pub fn stop(mut self) -> StopSummary {
        let mut out = StopSummary {
            died_during_run: !self.alive(),
            ..Default::default()
        };
        if let Some(child) = self.child.take() {
            out.exit = Some(match terminate(child) {
                Some(st) => st.to_string(),
                None => "did not stop within 10 s of SIGTERM (killed)".into(),
            });
        }
        if let Some(p) = &self.log_path {
            out.log = Some(summarize_log(p));
        }
        out
    }
}

/// Starts `sh -c "exec CMD"` with stderr appended to `log` and waits until `port` accepts.
fn spawn_listening(cmd: &str, log: &std::path::Path, port: u16) -> anyhow::Result<Child> {
    let log_file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("exec {cmd}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("start `{cmd}`"))?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait()? {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            bail!("server `{cmd}` exited with {st} before listening:\n{text}");
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("server `{cmd}` did not listen on {addr} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGTERM (unless already exited), up to 10 s for the exit, then SIGKILL.
pub fn terminate(mut child: Child) -> Option<std::process::ExitStatus> {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
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

fn summarize_log(path: &std::path::Path) -> LogSummary {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let text = strip_ansi(&text);
    let mut s = LogSummary::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        s.lines += 1;
        let is_err = line.contains("ERROR") || line.contains("panicked") || line.contains("Error");
        let is_warn = line.contains("WARN") || line.contains("Warning");
        if is_err {
            s.error += 1;
        } else if is_warn {
            s.warn += 1;
        }
        if (is_err || is_warn) && s.first.len() < 5 {
            s.first.push(line.chars().take(300).collect());
        }
    }
    s
}

/// Removes terminal colour sequences (ESC [ … letter) from log text.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn proc_cpu_seconds(stat_path: &str, clk_tck: f64) -> Option<f64> {
    let s = std::fs::read_to_string(stat_path).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // fields 14 and 15 of stat(5); `rest` starts at field 3
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clk_tck)
}

/// CPU seconds of this load generator.
pub fn self_cpu_seconds(clk_tck: f64) -> f64 {
    proc_cpu_seconds("/proc/self/stat", clk_tck).unwrap_or(0.0)
}

/// Samples the server's RSS every 200 ms and keeps the peak.
pub struct Sampler {
    peak: Arc<Mutex<u64>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub fn start(pid: u32) -> Sampler {
        let peak = Arc::new(Mutex::new(0u64));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let path = format!("/proc/{pid}/status");
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(t) = std::fs::read_to_string(&path) {
                    if let Some(v) = t
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                    {
                        let mut g = p.lock().unwrap();
                        *g = (*g).max(v);
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Sampler {
            peak,
            stop,
            handle: Some(handle),
        }
    }

    pub fn peak_kb(&self) -> u64 {
        *self.peak.lock().unwrap()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
