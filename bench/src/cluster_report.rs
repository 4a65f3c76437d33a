//! The "Cluster" section of RESULTS.md (bench/cluster.sh): fan-out runs against single servers
//! and against several instances sharing Redis, one table per measurement, one row per setup.
//! The section sits between two markers so bench/run.sh can regenerate the rest of the file and
//! keep it, and bench/cluster.sh can replace it alone.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::Value;

pub const BEGIN: &str = "<!-- cluster section: written by bench/cluster.sh -->";
pub const END: &str = "<!-- end of cluster section -->";

#[derive(Args, Debug)]
pub struct ClusterReportArgs {
    /// JSON-lines file(s) of fan-out runs (bench/cluster.sh writes one).
    #[arg(long, required = true)]
    input: Vec<PathBuf>,
    /// Markdown file in which to replace the cluster section (appended when it has none).
    #[arg(long)]
    out: PathBuf,
    /// Lines under the section's title (date, versions, command).
    #[arg(long)]
    note: Vec<String>,
}

type Col = (&'static str, fn(&Value) -> Option<f64>);

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, p| v.get(p))?.as_f64()
}

/// Server CPU of the instances plus Redis' per delivery: what the whole setup spends.
fn total_cpu(v: &Value) -> Option<f64> {
    let s = num(v, &["cpu_us_per_delivery"])?;
    Some(s + num(v, &["redis_cpu_us_per_delivery"]).unwrap_or(0.0))
}

const COLUMNS: &[Col] = &[
    ("instances", |v| num(v, &["instances"]).or(Some(1.0))),
    ("deliveries / expected (%)", |v| {
        Some(100.0 * num(v, &["delivered"])? / num(v, &["expected"])?.max(1.0))
    }),
    ("latency p50 (ms)", |v| num(v, &["lat_ms", "p50"])),
    ("latency p99 (ms)", |v| num(v, &["lat_ms", "p99"])),
    ("other-instance p99 (ms)", |v| {
        num(v, &["lat_remote_ms", "p99"])
    }),
    ("echo p99 (ms)", |v| num(v, &["echo_ms", "p99"])),
    ("servers' CPU per delivery (µs)", |v| {
        num(v, &["cpu_us_per_delivery"])
    }),
    ("Redis CPU per delivery (µs)", |v| {
        num(v, &["redis_cpu_us_per_delivery"])
    }),
    ("total CPU per delivery (µs)", total_cpu),
    ("converged on every instance (1 = yes)", |v| {
        v["convergence"]["converged"].as_bool().map(f64::from)
    }),
];

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

fn fmt(x: f64) -> String {
    match x.abs() {
        a if a >= 100.0 || x.fract() == 0.0 => format!("{x:.0}"),
        a if a >= 10.0 => format!("{x:.1}"),
        _ => format!("{x:.2}"),
    }
}

/// The section's Markdown, markers included.
fn section(recs: &[Value], notes: &[String]) -> String {
    let mut md = format!("{BEGIN}\n## Cluster\n\n");
    for n in notes {
        let _ = writeln!(md, "{n}  ");
    }
    // Scenario name → server label → runs, both in order of first appearance.
    let mut names: Vec<&str> = Vec::new();
    let mut by: BTreeMap<(usize, usize), Vec<&Value>> = BTreeMap::new();
    let mut servers: Vec<&str> = Vec::new();
    for r in recs {
        let (Some(name), Some(server)) = (r["name"].as_str(), r["server"].as_str()) else {
            continue;
        };
        let ni = names.iter().position(|n| *n == name).unwrap_or_else(|| {
            names.push(name);
            names.len() - 1
        });
        let si = servers
            .iter()
            .position(|s| *s == server)
            .unwrap_or_else(|| {
                servers.push(server);
                servers.len() - 1
            });
        by.entry((ni, si)).or_default().push(r);
    }
    for (ni, name) in names.iter().enumerate() {
        let first = by.iter().find(|((n, _), _)| *n == ni).map(|(_, v)| v[0]);
        let _ = write!(md, "\n### {name}\n\n");
        if let Some(f) = first {
            let _ = writeln!(
                md,
                "{} writer(s) × {} edits/s → {} readers in one document; {} s measured after {} s warm-up.\n",
                f["writers"], f["rate_per_writer"], f["readers"], f["window_s"], f["warmup_s"]
            );
        }
        md.push_str("| setup |");
        for (h, _) in COLUMNS {
            let _ = write!(md, " {h} |");
        }
        md.push_str("\n|---|");
        md.push_str(&"---:|".repeat(COLUMNS.len()));
        md.push('\n');
        for (si, server) in servers.iter().enumerate() {
            let Some(runs) = by.get(&(ni, si)) else {
                continue;
            };
            let _ = write!(md, "| {server} |");
            for (_, get) in COLUMNS {
                let ok: Vec<&&Value> = runs.iter().filter(|r| r["error"].is_null()).collect();
                let cell = median(ok.iter().filter_map(|r| get(r)).collect());
                let _ = write!(md, " {} |", cell.map_or("-".into(), fmt));
            }
            let failed = runs.iter().filter(|r| !r["error"].is_null()).count();
            if failed > 0 {
                let _ = write!(md, " ({failed} of {} runs failed)", runs.len());
            }
            md.push('\n');
        }
    }
    md.push_str(END);
    md.push('\n');
    md
}

pub fn run(a: &ClusterReportArgs) -> anyhow::Result<()> {
    let mut recs = Vec::new();
    for p in &a.input {
        let text = std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            recs.push(serde_json::from_str::<Value>(line).context("a JSON line")?);
        }
    }
    let new = section(&recs, &a.note);
    let old = std::fs::read_to_string(&a.out).unwrap_or_default();
    let out = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if e > b => {
            let rest = old[e + END.len()..].trim_start_matches('\n');
            let gap = if rest.is_empty() { "" } else { "\n" };
            format!("{}{new}{gap}{rest}", &old[..b])
        }
        _ if old.is_empty() => new,
        _ => format!("{}\n\n{new}", old.trim_end()),
    };
    std::fs::write(&a.out, out).with_context(|| format!("write {}", a.out.display()))?;
    Ok(())
}
