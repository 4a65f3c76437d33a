//! `collab-bench`: load generator comparing collab with the reference y-websocket server.
//!
//! Each scenario starts (or attaches to) one server, runs bounded in time, prints one JSON line
//! and a small human table; `report` turns the JSON lines of several servers into RESULTS.md.

mod client;
mod cluster;
mod cluster_report;
mod converge;
mod disk;
mod fanout;
mod floor;
mod join;
mod memory;
mod presence;
mod proto;
mod report;
mod rooms;
mod server;
mod stats;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(
    name = "collab-bench",
    about = "Load generator for y-websocket servers (collab and the reference)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// W writers → N readers in one document: latency, deliveries, server CPU per delivery.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: fanout::FanoutArgs,
    },
    /// K documents × C idle clients: server RSS per connection and per document.
    Rooms {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: rooms::RoomsArgs,
    },
    /// A large document, then M clients joining at once: connect → SyncStep2 time, RSS.
    Join {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: join::JoinArgs,
    },
    /// N clients in one document renewing their awareness state: share delivered, server CPU.
    Presence {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: presence::PresenceArgs,
    },
    /// A stored document opened after a server restart on the same data folder.
    Cold {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: disk::ColdArgs,
    },
    /// Inserts and deletes: bytes the server writes per byte of final document.
    Churn {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: disk::ChurnArgs,
    },
    /// Idle sockets, then a large document, opened and closed: does RSS come back?
    Memory {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: memory::MemoryArgs,
    },
    /// Writes a Markdown report from the JSON lines of earlier runs.
    Report(report::ReportArgs),
    /// Runs the floor server: relays each client frame as-is to the document's other sockets.
    Floor(floor::FloorArgs),
    /// Writes (or replaces) the Cluster section of a Markdown report from fan-out runs.
    ClusterReport(cluster_report::ClusterReportArgs),
}

#[derive(Args, Debug)]
struct Common {
    #[command(flatten)]
    server: server::ServerArgs,
    #[command(flatten)]
    cluster: cluster::ClusterArgs,
    /// Name of this measurement in the JSON line and the report (default: the scenario).
    #[arg(long)]
    name: Option<String>,
    /// Also append the JSON line to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Hard limit on the whole run, server start included.
    #[arg(long, default_value_t = 20.0)]
    max_seconds: f64,
    /// Bind client sockets to 127.0.0.1 … 127.0.0.N in turn (beyond ~28,000 connections to one
    /// port, one source address runs out of ephemeral ports).
    #[arg(long, default_value_t = 1)]
    source_ips: u8,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.cmd {
        Cmd::Report(r) => return report::run(r),
        Cmd::Floor(f) => return floor::run(f),
        Cmd::ClusterReport(r) => return cluster_report::run(r),
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async_main(cli))
}

async fn async_main(cli: Cli) -> anyhow::Result<()> {
    let (common, scenario) = match &cli.cmd {
        Cmd::Fanout { common, .. } => (common, "fanout"),
        Cmd::Rooms { common, .. } => (common, "rooms"),
        Cmd::Join { common, .. } => (common, "join"),
        Cmd::Presence { common, .. } => (common, "presence"),
        Cmd::Cold { common, .. } => (common, "cold"),
        Cmd::Churn { common, .. } => (common, "churn"),
        Cmd::Memory { common, .. } => (common, "memory"),
        Cmd::Report(_) | Cmd::Floor(_) | Cmd::ClusterReport(_) => unreachable!(),
    };
    client::set_source_ips(common.source_ips);
    let t0 = Instant::now();
    let mut srv = {
        let (args, c) = (common.server.clone(), common.cluster.clone());
        tokio::task::spawn_blocking(move || cluster::Cluster::start(&args, &c)).await??
    };
    let started_s = t0.elapsed().as_secs_f64();
    // The peak of the first instance only: fan-out reports the instances' summed RSS itself.
    let sampler = server::Sampler::start(srv.instances[0].pid);
    let budget = Duration::from_secs_f64((common.max_seconds - started_s).max(1.0));
    let fut = async {
        match &cli.cmd {
            Cmd::Fanout { args, .. } => fanout::run(args, &srv).await,
            Cmd::Rooms { args, .. } => rooms::run(args, srv.single()?).await,
            Cmd::Join { args, .. } => join::run(args, srv.single()?).await,
            Cmd::Presence { args, .. } => presence::run(args, srv.single()?).await,
            Cmd::Cold { args, .. } => disk::cold(args, srv.single()?).await,
            Cmd::Churn { args, .. } => disk::churn(args, srv.single()?).await,
            Cmd::Memory { args, .. } => memory::run(args, srv.single()?).await,
            Cmd::Report(_) | Cmd::Floor(_) | Cmd::ClusterReport(_) => unreachable!(),
        }
    };
    let outcome = tokio::time::timeout(budget, fut).await;
    let peak = sampler.peak_kb();
    drop(sampler);
    let label = common.server.server_label.clone();
    let stop = tokio::task::spawn_blocking(move || srv.stop()).await?;
    let name = common.name.clone().unwrap_or_else(|| scenario.to_string());
    let (mut j, rows, err) = match outcome {
        Ok(Ok((j, rows))) => (j, rows, None),
        Ok(Err(e)) => (
            json!({ "scenario": scenario }),
            vec![],
            Some(format!("{e:#}")),
        ),
        Err(_) => (
            json!({ "scenario": scenario }),
            vec![],
            Some(format!(
                "did not finish within --max-seconds {}",
                common.max_seconds
            )),
        ),
    };
    let obj = j.as_object_mut().expect("object");
    obj.insert("name".into(), json!(name));
    obj.insert("server".into(), json!(label));
    obj.insert("rss_peak_kb".into(), json!(peak));
    obj.insert("server_start_s".into(), json!(stats::round(started_s, 3)));
    obj.insert(
        "elapsed_s".into(),
        json!(stats::round(t0.elapsed().as_secs_f64(), 3)),
    );
    obj.insert("server_stop".into(), serde_json::to_value(&stop)?);
    obj.insert("error".into(), json!(err));
    let line = serde_json::to_string(&j)?;
    println!("{line}");
    if let Some(p) = &common.json_out {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("open {}", p.display()))?;
        writeln!(f, "{line}")?;
    }
    print_table(&name, &label, &rows, &j);
    if let Some(e) = err {
        eprintln!("error: {name} against {label}: {e}");
        std::process::exit(1);
    }
    Ok(())
}

fn print_table(name: &str, label: &str, rows: &[(String, String)], j: &Value) {
    let mut rows = rows.to_vec();
    rows.push((
        "server RSS peak".into(),
        format!("{} KiB", j["rss_peak_kb"]),
    ));
    let t = &j["trouble"];
    if !t.is_null() {
        rows.push((
            "client-side trouble".into(),
            format!(
                "{} disconnects, {} connect errors, {} unparsed frames",
                t["disconnects"], t["connect_errors"], t["unparsed_frames"]
            ),
        ));
        if let Some(ex) = t["examples"].as_array() {
            for e in ex.iter().take(3) {
                rows.push(("  e.g.".into(), e.as_str().unwrap_or_default().to_string()));
            }
        }
    }
    let s = &j["server_stop"];
    if let Some(l) = s.get("log").filter(|l| !l.is_null()) {
        rows.push((
            "server stderr".into(),
            format!(
                "{} lines, {} warnings, {} errors",
                l["lines"], l["warn"], l["error"]
            ),
        ));
        if let Some(ex) = l["first"].as_array() {
            for e in ex.iter().take(3) {
                rows.push(("  e.g.".into(), e.as_str().unwrap_or_default().to_string()));
            }
        }
    }
    if let Some(e) = s["exit"].as_str() {
        rows.push(("server exit after SIGTERM".into(), e.to_string()));
    }
    if s["died_during_run"].as_bool() == Some(true) {
        rows.push(("SERVER DIED DURING THE RUN".into(), String::new()));
    }
    let w = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    println!("── {name} · {label}");
    for (k, v) in rows {
        println!("  {k:<w$}  {v}");
    }
}
