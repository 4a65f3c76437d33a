//! The servers under test as a set: one `--server-cmd` process (the usual case), or N copies of
//! it sharing documents through a redis-server the generator starts itself (cluster mode, issue
//! #14). Fan-out spreads its connections over the instances; the other scenarios need exactly one.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::server::{self, Server, ServerArgs, StopSummary};

#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Start this many copies of --server-cmd, each with its own `{port}` and `{dir}` (and `{i}`,
    /// its index from 0). Fan-out puts writer w on instance w mod N and reader r on r mod N.
    #[arg(long, default_value_t = 1, requires = "server_cmd")]
    pub instances: usize,

    /// Start a redis-server first (AOF on, appendfsync always, maxmemory-policy noeviction, in a
    /// temporary folder, on a free port); `{redis_url}` and `{redis_port}` in --server-cmd name
    /// it. Its CPU is reported beside the servers'.
    #[arg(long, requires = "server_cmd")]
    pub redis: bool,

    /// The redis-server binary for --redis.
    #[arg(long, default_value = "redis-server")]
    pub redis_server: String,
}

pub struct Redis {
    child: Option<Child>,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Redis {
    fn start(bin: &str) -> anyhow::Result<Redis> {
        let dir = tempfile::Builder::new()
            .prefix("collab-bench-redis-")
            .tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = std::fs::File::create(dir.path().join("redis.log"))?;
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--maxmemory-policy", "noeviction", "--save", ""])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {bin}"))?;
        let mut r = Redis {
            child: Some(child),
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !r.pong() {
            if let Some(st) = r.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("{bin} exited with {st} before answering PING");
            }
            if Instant::now() > deadline {
                bail!("{bin} did not answer PING on port {port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(r)
    }

    fn pong(&self) -> bool {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }
}

pub struct Cluster {
    pub instances: Vec<Server>,
    redis: Option<Redis>,
    clk_tck: f64,
}

impl Cluster {
    pub fn start(args: &ServerArgs, c: &ClusterArgs) -> anyhow::Result<Cluster> {
        if c.instances == 0 {
            bail!("--instances must be at least 1");
        }
        let redis = c.redis.then(|| Redis::start(&c.redis_server)).transpose()?;
        let mut instances = Vec::with_capacity(c.instances);
        for i in 0..c.instances {
            let mut a = args.clone();
            if let Some(cmd) = &a.server_cmd {
                let mut cmd = cmd.replace("{i}", &i.to_string());
                if let Some(r) = &redis {
                    cmd = cmd
                        .replace("{redis_url}", &format!("redis://127.0.0.1:{}", r.port))
                        .replace("{redis_port}", &r.port.to_string());
                }
                a.server_cmd = Some(cmd);
            }
            if c.instances > 1 {
                a.server_log = a
                    .server_log
                    .map(|p| PathBuf::from(format!("{}.{i}", p.display())));
            }
            instances.push(Server::start(&a).with_context(|| format!("instance {i}"))?);
        }
        let clk_tck = instances[0].clk_tck();
        Ok(Cluster {
            instances,
            redis,
            clk_tck,
        })
    }

    /// The one server of every scenario but fan-out.
    pub fn single(&mut self) -> anyhow::Result<&mut Server> {
        match self.instances.as_mut_slice() {
            [one] => Ok(one),
            _ => bail!("only fanout runs on several --instances"),
        }
    }

    pub fn len(&self) -> usize {
        self.instances.len()
    }

    /// URL of a document on instance `k mod N`.
    pub fn url(&self, k: usize, doc: &str) -> String {
        self.instances[k % self.len()].url(doc)
    }

    pub fn framing(&self, doc: &str) -> crate::proto::Framing {
        self.instances[0].framing(doc)
    }

    pub fn clk_tck(&self) -> f64 {
        self.clk_tck
    }

    /// CPU seconds summed over the instances (Redis apart: `redis_cpu_seconds`).
    pub fn cpu_seconds(&self) -> Option<f64> {
        self.instances.iter().map(Server::cpu_seconds).sum()
    }

    pub fn redis_cpu_seconds(&self) -> Option<f64> {
        let pid = self.redis.as_ref()?.child.as_ref()?.id();
        server::proc_cpu_seconds(&format!("/proc/{pid}/stat"), self.clk_tck)
    }

    /// VmRSS summed over the instances, KiB.
    pub fn rss_kb(&self) -> Option<u64> {
        self.instances.iter().map(Server::rss_kb).sum()
    }

    /// SIGTERM to every instance, then Redis; one summary (logs added up, exits joined).
    pub fn stop(mut self) -> StopSummary {
        let stops: Vec<StopSummary> = self.instances.drain(..).map(Server::stop).collect();
        if let Some(c) = self.redis.as_mut().and_then(|r| r.child.take()) {
            server::terminate(c);
        }
        let mut out = stops[0].clone();
        for s in &stops[1..] {
            out.died_during_run |= s.died_during_run;
            out.exit = match (out.exit.take(), &s.exit) {
                (Some(a), Some(b)) if a == *b => Some(a),
                (Some(a), Some(b)) => Some(format!("{a}; {b}")),
                (a, b) => a.or_else(|| b.clone()),
            };
            if let (Some(l), Some(m)) = (out.log.as_mut(), &s.log) {
                l.lines += m.lines;
                l.warn += m.warn;
                l.error += m.error;
                l.first
                    .extend(m.first.iter().take(5 - l.first.len().min(5)).cloned());
            }
        }
        out
    }
}
