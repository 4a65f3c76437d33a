use serde_json::{json, Value};

/// Nearest-rank percentile of sorted values (p in 0..=100).
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

pub fn round(v: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (v * m).round() / m
}

/// p50/p90/p99/max of millisecond values, rounded to µs.
pub fn summary_ms(mut v: Vec<f64>) -> Value {
    v.sort_by(|a, b| a.total_cmp(b));
    let p = |q| percentile(&v, q).map(|x| round(x, 3));
    json!({
        "n": v.len(),
        "p50": p(50.0),
        "p90": p(90.0),
        "p99": p(99.0),
        "max": v.last().map(|x| round(*x, 3)),
    })
}

pub fn fmt_opt(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(0.0);
            if f.fract() == 0.0 && f.abs() < 1e15 {
                format!("{}", f as i64)
            } else {
                format!("{f:.3}")
            }
        }
        other => other.to_string(),
    }
}
