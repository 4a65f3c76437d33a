//! What one durable 30-byte append costs, in CPU time of the whole process (every thread,
//! sled's flusher threads included) and in wall time:
//! - `sled`: an insert plus `Db::flush`, what the store did before the dedicated log;
//! - `file`: a `write` plus `fdatasync` on a plain file;
//! - `store`: `SledStore::append` plus `SledStore::flush`, what the server runs now.
//!
//! cargo run --release -p collab-storage --example durable_append [-- APPENDS]

use std::io::Write;
use std::time::{Duration, Instant};

use collab_storage::{SledStore, Store};

/// User plus system CPU time of this process so far (Linux `/proc/self/stat`, 10 ms ticks).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let after = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

fn measure(name: &str, n: u64, mut op: impl FnMut(u64)) {
    op(0);
    let (cpu0, wall0) = (cpu_time(), Instant::now());
    for i in 1..=n {
        op(i);
    }
    let (cpu, wall) = (cpu_time() - cpu0, wall0.elapsed());
    println!(
        "{name:<10} {n} durable appends: {:>7.1} us CPU and {:>7.1} us wall per append",
        cpu.as_secs_f64() * 1e6 / n as f64,
        wall.as_secs_f64() * 1e6 / n as f64,
    );
}

fn update(i: u64) -> [u8; 30] {
    let mut u = [0x5a; 30];
    u[..8].copy_from_slice(&i.to_le_bytes());
    u
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map_or(5000, |s| s.parse().expect("APPENDS"));

    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path().join("sled"))
        .flush_every_ms(None)
        .open()
        .unwrap();
    measure("sled", n, |i| {
        db.insert(i.to_be_bytes(), &update(i)[..]).unwrap();
        db.flush().unwrap();
    });
    drop(db);

    let mut file = std::fs::File::create(dir.path().join("plain.log")).unwrap();
    measure("file", n, |i| {
        file.write_all(&update(i)).unwrap();
        file.sync_data().unwrap();
    });

    // The same on a file whose blocks were written beforehand: `fdatasync` then has no size or
    // block allocation to commit, only the data.
    let mut file = std::fs::File::create(dir.path().join("prewritten.log")).unwrap();
    file.write_all(&vec![0; (n as usize + 1) * 30]).unwrap();
    file.sync_all().unwrap();
    measure("prewritten", n, |i| {
        use std::os::unix::fs::FileExt;
        file.write_all_at(&update(i), i * 30).unwrap();
        file.sync_data().unwrap();
    });

    let store = SledStore::open(dir.path().join("store")).unwrap();
    measure("store", n, |i| {
        store.append("doc", i, &update(i)).unwrap();
        store.flush().unwrap();
    });
}
