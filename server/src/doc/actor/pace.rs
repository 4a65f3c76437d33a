//! `--max-send-share`: how much of its thread one document's broadcasts may take, kept as a
//! budget of send time. The budget fills at the share of wall time that passes (up to
//! `BURST`) and each delivery spends what it cost the thread in CPU time (its `send`s are most
//! of it). A delivery that finds the budget spent waits until it is refilled, and everything
//! arriving meanwhile goes out with it as one merged message: a message carrying several
//! updates costs a reader about what one carrying one does.
//!
//! CPU time, not wall time: on a busy machine a delivery preempted half-way would otherwise
//! count the other process's time against the document and delay its next broadcast. A
//! delivery to a few connections is charged its wall time instead (`flush.rs`): reading the
//! thread's CPU clock is a system call, dearer there than what it would correct.

use std::time::{Duration, Instant};

/// Send time a quiet document has in hand: a burst of edits, or one delivery to thousands of
/// readers, goes out without waiting.
const BURST: Duration = Duration::from_millis(5);

/// The longest a broadcast is held back: past this, a document with tens of thousands of
/// readers takes more than its share rather than its readers waiting longer.
const MAX_WAIT: Duration = Duration::from_millis(20);

/// A shorter wait is not worth a timer: tokio's tick is a millisecond, so it would wait that
/// long anyway. The deficit stays and the next delivery waits for it.
const MIN_WAIT: Duration = Duration::from_millis(1);

/// What the last delivery left behind: send time in hand and when the thread is quiet again.
/// Kept in 24 bytes, since every open document holds one (its task cell is at its limit).
pub(super) struct SendBudget {
    /// When the last delivery ended (at first, when the document opened).
    at: Instant,
    /// Send time in hand at `at`, in microseconds; negative while in debt.
    credit_us: i32,
    /// How long after `at` the thread counts as idle enough to flush inline (`flush.rs`).
    quiet_us: u32,
}

impl SendBudget {
    pub(super) fn new(now: Instant) -> Self {
        SendBudget {
            at: now,
            credit_us: micros(BURST),
            quiet_us: 0,
        }
    }

    /// Send time in hand at `now`: what was left, plus the share of the time since, up to
    /// `BURST`.
    fn credit(&self, now: Instant, share: u8) -> i32 {
        let gained =
            i64::from(micros(now.saturating_duration_since(self.at))) * i64::from(share) / 100;
        (i64::from(self.credit_us) + gained).min(i64::from(micros(BURST))) as i32
    }

    /// Counts a delivery that ended at `now`, cost `cost` of CPU time and kept the thread busy
    /// for `took`; the debt is bounded by what `MAX_WAIT` can pay back.
    pub(super) fn spend(&mut self, cost: Duration, took: Duration, now: Instant, share: u8) {
        let floor = -micros(MAX_WAIT) * i32::from(share) / 100;
        self.credit_us = self
            .credit(now, share)
            .saturating_sub(micros(cost))
            .max(floor);
        self.at = now;
        self.quiet_us = micros(took) as u32;
    }

    /// How long the next delivery should wait, if at all.
    pub(super) fn wait(&self, now: Instant, share: u8) -> Option<Duration> {
        if share >= 100 {
            return None;
        }
        let credit = self.credit(now, share);
        if credit >= 0 {
            return None;
        }
        let wait =
            Duration::from_micros((-i64::from(credit) * 100 / i64::from(share.max(1))) as u64);
        (wait >= MIN_WAIT).then_some(wait.min(MAX_WAIT))
    }

    /// The thread has been quiet since the last delivery for as long as that took, and for
    /// at least `min`.
    pub(super) fn quiet(&self, now: Instant, min: Duration) -> bool {
        now >= self.at + Duration::from_micros(u64::from(self.quiet_us)).max(min)
    }
}

/// Microseconds, saturating: every duration here is far below 35 minutes.
fn micros(d: Duration) -> i32 {
    i32::try_from(d.as_micros()).unwrap_or(i32::MAX)
}

/// CPU time this thread has used, user and system.
pub(super) fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_document_within_its_share_never_waits() {
        let t0 = Instant::now();
        let mut b = SendBudget::new(t0);
        // 0.25 ms of sends per 1 ms edit: a quarter of the thread, under a third.
        for i in 1..1000 {
            let now = t0 + MS * i;
            assert_eq!(b.wait(now, 33), None, "edit {i}");
            b.spend(MS / 4, MS / 4, now, 33);
        }
    }

    #[test]
    fn a_burst_goes_out_at_once_and_a_sustained_overload_waits_for_its_share() {
        let t0 = Instant::now();
        let mut b = SendBudget::new(t0);
        // 0.8 ms of sends per delivery, edits every millisecond.
        let mut now = t0;
        let mut waited = Duration::ZERO;
        let mut deliveries = 0;
        while now < t0 + MS * 1000 {
            if let Some(w) = b.wait(now, 33) {
                assert!(w <= MAX_WAIT);
                now += w;
                waited += w;
            }
            b.spend(MS * 8 / 10, MS, now, 33);
            deliveries += 1;
            now += MS;
        }
        // The first deliveries spend the burst; then the sends hold near a third of the time.
        assert!(waited > MS * 300, "waited {waited:?}");
        let share = deliveries as f64 * 0.8 / (now - t0).as_secs_f64() / 1000.0;
        assert!((0.30..0.40).contains(&share), "share {share}");
    }

    #[test]
    fn one_huge_delivery_waits_no_longer_than_the_limit_and_then_recovers() {
        let t0 = Instant::now();
        let mut b = SendBudget::new(t0);
        b.spend(MS * 500, MS * 500, t0, 33);
        assert_eq!(b.wait(t0, 33), Some(MAX_WAIT));
        assert_eq!(b.wait(t0 + MAX_WAIT, 33), None);
    }

    #[test]
    fn share_100_never_waits() {
        let t0 = Instant::now();
        let mut b = SendBudget::new(t0);
        b.spend(MS * 500, MS * 500, t0, 100);
        assert_eq!(b.wait(t0, 100), None);
    }

    #[test]
    fn thread_cpu_time_counts_work_on_this_thread() {
        let before = thread_cpu_time();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_time() > before);
    }
}
