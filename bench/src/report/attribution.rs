//! Where collab's CPU goes: durability against everything else. `collab-tmpfs` is the same
//! binary with its data folder on tmpfs, where `fdatasync` returns at once, so collab minus
//! collab-tmpfs is what making each edit durable costs, and collab-tmpfs ÷ a peer compares the
//! rest of the work with a server that never fsyncs (y-sweet) or does no CRDT at all (floor).

use std::fmt::Write as _;

use serde_json::Value;

use super::{fmt, median, num};

/// The server that runs without a device flush (bench/run.sh's opt-in `collab-tmpfs`).
pub(super) const TMPFS: &str = "collab-tmpfs";

/// Measurements with a CPU figure per delivery: the fan-out points, then the rooms edits.
pub(super) const POINTS: [&str; 8] = [
    "fanout-50",
    "fanout-200",
    "fanout-1000",
    "fanout-50-r1000",
    "fanout-200-r1000",
    "fanout-1000-r1000",
    "rooms",
    "rooms-2500x4",
];

/// Peers the fsync-free figure is compared with, where they ran.
const PEERS: [&str; 3] = ["y-sweet", "ref", "floor"];

/// Server CPU per delivered update (fan-out) or per delivered edit (rooms' edit phase).
fn one_run(r: &Value) -> Option<f64> {
    num(r, &["cpu_us_per_delivery"]).or_else(|| {
        let busy = num(r, &["edits", "server_cpu_util"])?;
        let secs = num(r, &["edits", "seconds"])?;
        let delivered = num(r, &["edits", "delivered"])?;
        (delivered > 0.0).then(|| busy * secs * 1e6 / delivered)
    })
}

/// The median of [`one_run`] over the runs of one measurement against one server.
pub(super) fn cpu_per_delivery(recs: &[Value], name: &str, server: &str) -> Option<f64> {
    median(
        recs.iter()
            .filter(|r| r["name"].as_str() == Some(name) && r["server"].as_str() == Some(server))
            .filter_map(one_run)
            .collect(),
    )
}

/// The table, when both collab and collab-tmpfs ran at least one of the points.
pub(super) fn durability_share(md: &mut String, recs: &[Value], base: &str) -> std::fmt::Result {
    let rows: Vec<(&str, f64, f64)> = POINTS
        .iter()
        .filter_map(|&n| {
            Some((
                n,
                cpu_per_delivery(recs, n, base)?,
                cpu_per_delivery(recs, n, TMPFS)?,
            ))
        })
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    let peers: Vec<&str> = PEERS
        .into_iter()
        .filter(|p| {
            rows.iter()
                .any(|(n, _, _)| cpu_per_delivery(recs, n, p).is_some())
        })
        .collect();
    writeln!(
        md,
        "Where {base}'s CPU goes: `{TMPFS}` is the same binary with its data folder on tmpfs \
         (`fdatasync` returns at once), so the difference is what durability costs on this \
         machine's disk. Server CPU per delivered update (rooms: per delivered edit), µs:\n"
    )?;
    let mut head = format!("| measurement | {base} | {TMPFS} | durability | share |");
    let mut sep = String::from("|---|---:|---:|---:|---:|");
    for p in &peers {
        write!(head, " {base} ÷ {p} | {TMPFS} ÷ {p} |")?;
        sep.push_str("---:|---:|");
    }
    writeln!(md, "{head}\n{sep}")?;
    for (name, with, without) in rows {
        let durability = with - without;
        let mut row = format!(
            "| {name} | {} | {} | {} | {:.0} % |",
            fmt(with),
            fmt(without),
            fmt(durability),
            100.0 * durability / with
        );
        for p in &peers {
            match cpu_per_delivery(recs, name, p).filter(|&o| o > 0.0) {
                Some(o) => write!(row, " {:.2}× | {:.2}× |", with / o, without / o)?,
                None => row.push_str(" – | – |"),
            }
        }
        writeln!(md, "{row}")?;
    }
    writeln!(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_durability_share_is_collab_minus_its_fsync_free_twin() {
        let recs = vec![
            json!({"name": "fanout-50-r1000", "server": "collab", "cpu_us_per_delivery": 9.5}),
            json!({"name": "fanout-50-r1000", "server": TMPFS, "cpu_us_per_delivery": 6.25}),
            json!({"name": "fanout-50-r1000", "server": "y-sweet", "cpu_us_per_delivery": 5.0}),
            json!({"name": "rooms-2500x4", "server": "collab",
                   "edits": {"server_cpu_util": 0.375, "seconds": 8.0, "delivered": 100000.0}}),
            json!({"name": "rooms-2500x4", "server": TMPFS,
                   "edits": {"server_cpu_util": 0.25, "seconds": 8.0, "delivered": 100000.0}}),
        ];
        let mut md = String::new();
        durability_share(&mut md, &recs, "collab").unwrap();
        assert!(
            md.contains("| fanout-50-r1000 | 9.50 | 6.25 | 3.25 | 34 % | 1.90× | 1.25× |"),
            "{md}"
        );
        assert!(
            md.contains("| rooms-2500x4 | 30 | 20 | 10 | 33 % | – | – |"),
            "{md}"
        );
        assert!(!md.contains("floor"), "{md}");

        let mut none = String::new();
        durability_share(&mut none, &recs[2..3], "collab").unwrap();
        assert!(none.is_empty());
    }
}
