//! SVG bar charts of the headline figures, one group per measurement and one bar per server.

use anyhow::Context;
use serde_json::Value;

use super::{fmt, median, num};

/// Grouped bar chart as hand-written SVG: one group per measurement, one bar per server.
fn bar_chart(
    title: &str,
    unit: &str,
    groups: &[String],
    series: &[String],
    vals: &[Vec<Option<f64>>],
) -> String {
    const COLORS: [&str; 6] = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    ];
    let (w, h, left, top, bottom) = (860.0, 360.0, 70.0, 50.0, 70.0);
    let max = vals
        .iter()
        .flatten()
        .flatten()
        .fold(0.0f64, |m, v| m.max(*v))
        .max(1e-9);
    let plot_w = w - left - 20.0;
    let plot_h = h - top - bottom;
    let gw = plot_w / groups.len().max(1) as f64;
    let bw = (gw * 0.8) / series.len().max(1) as f64;
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;");
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/><text x="{left}" y="20" font-size="14">{} ({})</text>"#,
        esc(title),
        esc(unit)
    );
    for i in 0..=4 {
        let v = max * f64::from(i) / 4.0;
        let y = top + plot_h - plot_h * f64::from(i) / 4.0;
        svg += &format!(
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - 20.0,
            left - 4.0,
            y + 4.0,
            fmt(v)
        );
    }
    for (g, name) in groups.iter().enumerate() {
        let gx = left + gw * g as f64 + gw * 0.1;
        for (s, _) in series.iter().enumerate() {
            let Some(v) = vals[g][s] else { continue };
            let bh = plot_h * v / max;
            let x = gx + bw * s as f64;
            svg += &format!(
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{}"><title>{}: {}</title></rect>"#,
                top + plot_h - bh,
                bw * 0.95,
                COLORS[s % COLORS.len()],
                esc(&series[s]),
                fmt(v)
            );
        }
        svg += &format!(
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + gw * 0.4,
            top + plot_h + 16.0,
            esc(name)
        );
    }
    for (s, name) in series.iter().enumerate() {
        let x = left + 130.0 * s as f64;
        let y = h - 18.0;
        svg += &format!(
            r#"<rect x="{x}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{y}">{}</text>"#,
            y - 9.0,
            COLORS[s % COLORS.len()],
            x + 14.0,
            esc(name)
        );
    }
    svg += "</svg>\n";
    svg
}

/// Writes the charts that have data; returns their file names.
pub(super) fn charts(
    dir: &std::path::Path,
    recs: &[Value],
    servers: &[String],
    names: &[String],
) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let of = |scenario: &str| -> Vec<String> {
        names
            .iter()
            .filter(|n| {
                recs.iter().any(|r| {
                    r["name"].as_str() == Some(n.as_str())
                        && r["scenario"].as_str() == Some(scenario)
                })
            })
            .cloned()
            .collect()
    };
    let join150 = |v: &Value| {
        v["joins"]
            .as_array()?
            .iter()
            .find(|j| j["clients"].as_u64() == Some(150))
            .and_then(|j| num(j, &["sync_ms", "p99"]))
    };
    type Pick = Box<dyn Fn(&Value) -> Option<f64>>;
    let p = |path: &'static [&'static str]| -> Pick { Box::new(move |v| num(v, path)) };
    let specs: Vec<(&str, &str, &str, &str, Pick)> = vec![
        (
            "fanout_p50.svg",
            "fanout",
            "Fan-out latency p50",
            "ms",
            p(&["lat_ms", "p50"]),
        ),
        (
            "fanout_p99.svg",
            "fanout",
            "Fan-out latency p99",
            "ms",
            p(&["lat_ms", "p99"]),
        ),
        (
            "fanout_cpu.svg",
            "fanout",
            "Server CPU per delivered update",
            "µs",
            p(&["cpu_us_per_delivery"]),
        ),
        (
            "rooms_rss_conn.svg",
            "rooms",
            "RSS per connection",
            "KiB",
            p(&["rss_kb_per_conn"]),
        ),
        (
            "rooms_rss_doc.svg",
            "rooms",
            "RSS per document",
            "KiB",
            p(&["rss_kb_per_doc"]),
        ),
        (
            "join_p99.svg",
            "join",
            "150 clients joining: connect → SyncStep2 p99",
            "ms",
            Box::new(join150),
        ),
        (
            "presence_cpu.svg",
            "presence",
            "Presence: server CPU",
            "% of one core",
            p(&["cpu_pct_one_core"]),
        ),
    ];
    let mut written = Vec::new();
    for (file, scenario, title, unit, pick) in specs {
        let groups = of(scenario);
        let vals: Vec<Vec<Option<f64>>> = groups
            .iter()
            .map(|g| {
                servers
                    .iter()
                    .map(|s| {
                        median(
                            recs.iter()
                                .filter(|r| {
                                    r["name"].as_str() == Some(g.as_str())
                                        && r["server"].as_str() == Some(s.as_str())
                                })
                                .filter_map(&pick)
                                .collect(),
                        )
                    })
                    .collect()
            })
            .collect();
        if vals.iter().flatten().all(Option::is_none) {
            continue;
        }
        let svg = bar_chart(title, unit, &groups, servers, &vals);
        std::fs::write(dir.join(file), svg).with_context(|| format!("write {file}"))?;
        written.push(file.to_string());
    }
    Ok(written)
}
