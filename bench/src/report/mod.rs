//! Turns the JSON lines of a run into a Markdown report: one table per measurement, one column
//! per server, and the ratio of the base server (collab) to each other one.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::Value;

mod attribution;
mod charts;
mod targets;

use charts::charts;
use targets::targets;

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// JSON-lines file(s) written with --json-out.
    #[arg(long, required = true)]
    input: Vec<PathBuf>,
    /// Markdown file to write.
    #[arg(long)]
    out: PathBuf,
    /// Server label whose figures are divided by the others'.
    #[arg(long, default_value = "collab")]
    base: String,
    /// Extra lines for the header (versions, command, date).
    #[arg(long)]
    note: Vec<String>,
    /// Server label the targets are stated against (collab ÷ this).
    #[arg(long = "ref", default_value = "ref")]
    reference: String,
    /// Folder for SVG charts (none when not given).
    #[arg(long)]
    charts: Option<PathBuf>,
}

type Get = Box<dyn Fn(&Value) -> Option<f64>>;

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    let mut v = v;
    for p in path {
        v = v.get(p)?;
    }
    v.as_f64()
}

fn metrics(scenario: &str, sample: &[&Value]) -> Vec<(String, Get)> {
    let p = |path: &'static [&'static str]| -> Get { Box::new(move |v| num(v, path)) };
    match scenario {
        "fanout" => vec![
            (
                "server CPU per delivered update (µs)".into(),
                p(&["cpu_us_per_delivery"]),
            ),
            ("latency p50 (ms)".into(), p(&["lat_ms", "p50"])),
            ("latency p99 (ms)".into(), p(&["lat_ms", "p99"])),
            ("latency max (ms)".into(), p(&["lat_ms", "max"])),
            ("echo to writer p99 (ms)".into(), p(&["echo_ms", "p99"])),
            (
                "deliveries / expected (%)".into(),
                Box::new(|v| {
                    let (d, e) = (num(v, &["delivered"])?, num(v, &["expected"])?);
                    (e > 0.0).then(|| 100.0 * d / e)
                }),
            ),
            ("server cores busy".into(), p(&["cpu_util"])),
            (
                "server RSS connected (KiB)".into(),
                p(&["rss_kb", "connected"]),
            ),
            (
                "converged (fresh client: text and every writer's clock) (1 = yes)".into(),
                Box::new(|v| {
                    v["convergence"]["converged"]
                        .as_bool()
                        .map(|b| f64::from(u8::from(b)))
                }),
            ),
        ],
        "presence" => vec![
            (
                "server CPU (% of one core)".into(),
                p(&["cpu_pct_one_core"]),
            ),
            (
                "awareness updates delivered (%)".into(),
                p(&["delivered_pct"]),
            ),
            ("delivered".into(), p(&["delivered"])),
            ("expected".into(), p(&["expected"])),
            ("latency p50 (ms)".into(), p(&["lat_ms", "p50"])),
            ("latency p99 (ms)".into(), p(&["lat_ms", "p99"])),
            (
                "server CPU per delivery (µs)".into(),
                p(&["cpu_us_per_delivery"]),
            ),
            (
                "server RSS connected (KiB)".into(),
                p(&["rss_kb", "connected"]),
            ),
        ],
        "cold" => vec![
            ("document encoded (bytes)".into(), p(&["doc_bytes"])),
            (
                "after restart: connect → SyncStep2 p50 (ms)".into(),
                p(&["cold_ms", "p50"]),
            ),
            (
                "after restart: whole document received p50 (ms)".into(),
                p(&["complete_ms", "p50"]),
            ),
            (
                "restarts answered with an incomplete SyncStep2".into(),
                p(&["first_step2_incomplete"]),
            ),
            (
                "restarts losing the document (in memory: all)".into(),
                p(&["restarts_losing_the_document"]),
            ),
            ("second client p50 (ms)".into(), p(&["warm_ms", "p50"])),
            (
                "restart → listening p50 (ms)".into(),
                p(&["restart_to_listen_ms", "p50"]),
            ),
            ("data folder (bytes)".into(), p(&["data_dir_bytes"])),
            (
                "RSS with the document loaded (KiB)".into(),
                p(&["rss_kb_loaded"]),
            ),
        ],
        "churn" => vec![
            ("final document encoded (bytes)".into(), p(&["doc_bytes"])),
            ("update bytes sent".into(), p(&["sent_bytes"])),
            (
                "bytes written (/proc/PID/io write_bytes)".into(),
                p(&["io_write_bytes"]),
            ),
            (
                "write amplification: written ÷ final document".into(),
                p(&["write_amplification"]),
            ),
            (
                "written ÷ update bytes sent".into(),
                p(&["written_per_sent_byte"]),
            ),
            ("data folder (bytes)".into(), p(&["data_dir_bytes"])),
            (
                "data folder ÷ final document".into(),
                p(&["dir_per_doc_byte"]),
            ),
            ("workload time (s)".into(), p(&["churn_s"])),
            (
                "converged (1 = yes)".into(),
                Box::new(|v| v["converged"].as_bool().map(|b| f64::from(u8::from(b)))),
            ),
        ],
        "rooms" => vec![
            ("RSS per connection (KiB)".into(), p(&["rss_kb_per_conn"])),
            ("RSS per document (KiB)".into(), p(&["rss_kb_per_doc"])),
            ("RSS idle server (KiB)".into(), p(&["rss_kb", "idle"])),
            (
                "RSS all connected (KiB)".into(),
                p(&["rss_kb", "connected"]),
            ),
            ("connect + sync all (s)".into(), p(&["connect_s"])),
            (
                "server CPU while connecting (s)".into(),
                p(&["cpu_s_connecting"]),
            ),
            ("connected".into(), p(&["connected"])),
            ("connect rate (connections/s)".into(), p(&["connect_rate"])),
            (
                "edits: latency p50 (ms)".into(),
                p(&["edits", "lat_ms", "p50"]),
            ),
            (
                "edits: latency p99 (ms)".into(),
                p(&["edits", "lat_ms", "p99"]),
            ),
            (
                "edits: delivered / expected (%)".into(),
                Box::new(|v| {
                    let (d, e) = (
                        num(v, &["edits", "delivered"])?,
                        num(v, &["edits", "expected"])?,
                    );
                    (e > 0.0).then(|| 100.0 * d / e)
                }),
            ),
            (
                "edits: server cores busy".into(),
                p(&["edits", "server_cpu_util"]),
            ),
            (
                "edits: server CPU per delivered edit (µs)".into(),
                Box::new(|v| {
                    let busy = num(v, &["edits", "server_cpu_util"])?;
                    let secs = num(v, &["edits", "seconds"])?;
                    let d = num(v, &["edits", "delivered"])?;
                    (d > 0.0).then(|| busy * secs * 1e6 / d)
                }),
            ),
        ],
        "memory" => {
            let mut m: Vec<(String, Get)> = vec![("RSS idle (KiB)".into(), p(&["rss_kb_idle"]))];
            for (phase, what) in [
                ("sockets_phase", "idle sockets"),
                ("document_phase", "large document"),
            ] {
                m.push((
                    format!("{what}: RSS loaded (KiB)"),
                    Box::new(move |v| num(v, &[phase, "rss_kb_loaded"])),
                ));
                for t in ["10s", "30s", "60s"] {
                    m.push((
                        format!("{what}: RSS {t} after close (KiB)"),
                        Box::new(move |v| num(v, &[phase, "rss_kb_after_close", t])),
                    ));
                }
                m.push((
                    format!("{what}: RSS at the end ÷ idle"),
                    Box::new(move |v| num(v, &[phase, "ratio_to_idle_last"])),
                ));
                m.push((
                    format!("{what}: seconds until ≤ 2× idle"),
                    Box::new(move |v| num(v, &[phase, "seconds_to_2x_idle"])),
                ));
            }
            m
        }
        "join" => {
            let mut m: Vec<(String, Get)> = vec![
                ("document encoded (bytes)".into(), p(&["doc_bytes"])),
                (
                    "build: all batches applied and echoed (s)".into(),
                    p(&["build_s"]),
                ),
                (
                    "RSS with the document loaded (KiB)".into(),
                    p(&["rss_kb", "loaded"]),
                ),
                (
                    "RSS growth for the document (KiB)".into(),
                    p(&["rss_delta_kb"]),
                ),
                ("RSS peak (KiB)".into(), p(&["rss_peak_kb"])),
            ];
            let mut counts: Vec<u64> = sample
                .iter()
                .flat_map(|v| v["joins"].as_array().cloned().unwrap_or_default())
                .filter_map(|j| j["clients"].as_u64())
                .collect();
            counts.sort();
            counts.dedup();
            for c in counts {
                let get = move |v: &Value, what: &'static [&'static str]| {
                    v["joins"]
                        .as_array()?
                        .iter()
                        .find(|j| j["clients"].as_u64() == Some(c))
                        .and_then(|j| num(j, what))
                };
                m.push((
                    format!("{c} joining: connect → SyncStep2 p50 (ms)"),
                    Box::new(move |v| get(v, &["sync_ms", "p50"])),
                ));
                m.push((
                    format!("{c} joining: connect → SyncStep2 p99 (ms)"),
                    Box::new(move |v| get(v, &["sync_ms", "p99"])),
                ));
                m.push((
                    format!("{c} joining: server CPU per join (ms)"),
                    Box::new(move |v| get(v, &["server_cpu_ms_per_join"])),
                ));
                m.push((
                    format!("{c} joining: failures"),
                    Box::new(move |v| get(v, &["failures"])),
                ));
            }
            m
        }
        _ => vec![],
    }
}

fn describe(v: &Value) -> String {
    match v["scenario"].as_str() {
        Some("fanout") => format!(
            "{} writer(s) × {} edits/s → {} readers in one document; {} s measured after {} s warm-up",
            v["writers"], v["rate_per_writer"], v["readers"], v["window_s"], v["warmup_s"]
        ),
        Some("rooms") => format!(
            "{} documents × {} idle clients (awareness: {})",
            v["docs"], v["per_doc"], v["awareness"]
        ),
        Some("join") => format!(
            "{} inserts of 1–{} characters (seed {}, jump {}, batches of {}), {} bytes encoded",
            v["ops"],
            v["word"].as_u64().unwrap_or(1),
            v["seed"],
            v["jump"],
            v["batch"],
            v["doc_bytes"]
        ),
        Some("presence") => format!(
            "{} clients in one document, each renewing its awareness state every {} s; {} s measured after {} s warm-up",
            v["clients"], v["interval_s"], v["window_s"], v["warmup_s"]
        ),
        Some("cold") => format!(
            "a {}-operation document ({} bytes) stored, then {} server restarts on the same data folder; the first client after each restart makes the server load it",
            v["ops"], v["doc_bytes"], v["restarts"]
        ),
        Some("churn") => format!(
            "{} edits (60 % inserts of 1–8 characters, 40 % deletions of 1–16) at random positions, {} per update; bytes written by the server process over it",
            v["ops"], v["per_update"]
        ),
        Some("memory") => format!(
            "{} idle sockets ({} documents × 4) opened and closed, then a {}-operation document built, fetched by {} clients and closed; RSS sampled for {} s after each close",
            v["sockets"],
            v["sockets"].as_u64().unwrap_or(0) / 4,
            v["ops"],
            v["joiners"],
            v["watch_s"]
        ),
        _ => String::new(),
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn fmt(x: f64) -> String {
    let a = x.abs();
    if a >= 1000.0 || (x.fract() == 0.0 && a < 1e15) {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn machine() -> Vec<String> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or("?".into(), |kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0));
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    vec![
        format!("- cores (nproc): {cores}"),
        format!("- memory: {mem}"),
        format!("- CPU: {cpu}"),
        format!("- Linux {}", kernel.trim()),
        "- load generator, servers and (while this ran) possibly other work share the same cores"
            .into(),
    ]
}

pub fn run(a: &ReportArgs) -> anyhow::Result<()> {
    let mut recs: Vec<Value> = Vec::new();
    for p in &a.input {
        let text = std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
        for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
            recs.push(
                serde_json::from_str(line)
                    .with_context(|| format!("bad JSON line in {}", p.display()))?,
            );
        }
    }
    let mut servers: Vec<String> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for r in &recs {
        let s = r["server"].as_str().unwrap_or("?").to_string();
        if !servers.contains(&s) {
            servers.push(s);
        }
        let n = r["name"].as_str().unwrap_or("?").to_string();
        if !names.contains(&n) {
            names.push(n);
        }
    }
    // Base first.
    if let Some(i) = servers.iter().position(|s| *s == a.base) {
        let b = servers.remove(i);
        servers.insert(0, b);
    }
    let others: Vec<&String> = servers.iter().filter(|s| **s != a.base).collect();
    let has_base = servers.first() == Some(&a.base);

    let mut md = String::new();
    writeln!(md, "# collab benchmark results\n")?;
    for n in &a.note {
        writeln!(md, "{n}  ")?;
    }
    writeln!(md, "\n## Machine\n")?;
    for l in machine() {
        writeln!(md, "{l}")?;
    }
    writeln!(
        md,
        "\nRatios are {base} ÷ other server: below 1 means {base} used less (CPU, memory, time).\n",
        base = a.base
    )?;

    for name in &names {
        // Every run of this measurement, per server (a repeated run gives the median).
        let by_server: Vec<Vec<&Value>> = servers
            .iter()
            .map(|s| {
                recs.iter()
                    .filter(|r| r["name"].as_str() == Some(name) && r["server"].as_str() == Some(s))
                    .collect()
            })
            .collect();
        let present: Vec<&Value> = by_server.iter().flatten().copied().collect();
        let Some(first) = present.first() else {
            continue;
        };
        let runs = by_server.iter().map(Vec::len).max().unwrap_or(0);
        let scenario = first["scenario"].as_str().unwrap_or("?");
        writeln!(md, "## {name}\n")?;
        writeln!(
            md,
            "{}{}\n",
            describe(first),
            if runs > 1 {
                format!("; median of {runs} runs")
            } else {
                String::new()
            }
        )?;
        let mut head = String::from("| metric |");
        let mut sep = String::from("|---|");
        for s in &servers {
            write!(head, " {s} |")?;
            sep.push_str("---:|");
        }
        if has_base {
            for o in &others {
                write!(head, " {} / {o} |", a.base)?;
                sep.push_str("---:|");
            }
        }
        writeln!(md, "{head}\n{sep}")?;
        for (label, get) in metrics(scenario, &present) {
            let vals: Vec<Option<f64>> = by_server
                .iter()
                .map(|rs| median(rs.iter().filter_map(|r| get(r)).collect()))
                .collect();
            let mut row = format!("| {label} |");
            for v in &vals {
                write!(row, " {} |", v.map_or("–".into(), fmt))?;
            }
            if has_base {
                for (i, _) in others.iter().enumerate() {
                    let r = match (vals[0], vals[i + 1]) {
                        (Some(b), Some(o)) if o != 0.0 => format!("{:.2}", b / o),
                        _ => "–".into(),
                    };
                    write!(row, " {r} |")?;
                }
            }
            writeln!(md, "{row}")?;
        }
        // Problems seen in this measurement.
        let mut notes = Vec::new();
        for (s, rs) in servers.iter().zip(&by_server) {
            if rs.is_empty() {
                notes.push(format!("{s}: no result"));
            }
            for r in rs {
                if let Some(e) = r["error"].as_str() {
                    notes.push(format!("{s}: run failed: {e}"));
                }
                let t = &r["trouble"];
                for k in ["disconnects", "connect_errors", "unparsed_frames"] {
                    if let Some(n) = t[k].as_u64().filter(|n| *n > 0) {
                        notes.push(format!("{s}: {n} {}", k.replace('_', " ")));
                    }
                }
                if let Some(ex) = t["examples"].as_array().filter(|e| !e.is_empty()) {
                    notes.push(format!(
                        "{s}: e.g. `{}`",
                        ex[0].as_str().unwrap_or_default()
                    ));
                }
                for k in ["missing", "duplicates"] {
                    if let Some(n) = r[k].as_u64().filter(|n| *n > 0) {
                        notes.push(format!("{s}: {n} {k} deliveries"));
                    }
                }
                let st = &r["server_stop"];
                if st["died_during_run"].as_bool() == Some(true) {
                    notes.push(format!("{s}: the server died during the run"));
                }
                if let Some(e) = st["exit"]
                    .as_str()
                    .filter(|e| !e.contains("exit status: 0") && !e.contains("signal: 15"))
                {
                    notes.push(format!("{s}: exit after SIGTERM: {e}"));
                }
                let l = &st["log"];
                if l["warn"].as_u64().unwrap_or(0) + l["error"].as_u64().unwrap_or(0) > 0 {
                    notes.push(format!(
                        "{s}: stderr had {} warnings and {} errors, first: `{}`",
                        l["warn"],
                        l["error"],
                        l["first"][0].as_str().unwrap_or_default()
                    ));
                }
            }
        }
        if !notes.is_empty() {
            writeln!(md, "\nSeen during the runs:")?;
            for n in notes {
                writeln!(md, "- {n}")?;
            }
        }
        writeln!(md)?;
    }
    targets(&mut md, &recs, &a.base, &a.reference)?;
    attribution::durability_share(&mut md, &recs, &a.base)?;
    if let Some(dir) = &a.charts {
        let written = charts(dir, &recs, &servers, &names)?;
        if !written.is_empty() {
            writeln!(md, "## Charts\n")?;
            for f in written {
                writeln!(md, "![{f}](charts/{f})\n")?;
            }
        }
    }
    std::fs::write(&a.out, md).with_context(|| format!("write {}", a.out.display()))?;
    Ok(())
}
