//! Per-connection rate limit: token buckets on messages and bytes. A connection over budget is
//! not read from until it is back within it (TCP then pushes back on the sender), and one that
//! stays over budget past the grace period is closed.

use std::time::{Duration, Instant};

/// A token bucket that may go into debt: one message bigger than the whole bucket (a pasted
/// document) is let through, and the debt is paid back by waiting.
#[derive(Debug)]
struct Bucket {
    per_sec: f64,
    capacity: f64,
    tokens: f64,
}

impl Bucket {
    fn new(per_sec: u64, burst: Duration) -> Bucket {
        let per_sec = per_sec as f64;
        let capacity = (per_sec * burst.as_secs_f64()).max(per_sec).max(1.0);
        Bucket {
            per_sec,
            capacity,
            tokens: capacity,
        }
    }

    fn refill(&mut self, elapsed: f64) {
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
    }

    /// Spends `cost`; how long until the bucket is out of debt.
    fn spend(&mut self, cost: f64) -> Duration {
        self.tokens -= cost;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_sec)
        }
    }
}

/// What the connection must do after spending.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within budget: keep reading.
    Go,
    /// Over budget: stop reading for this long.
    Pause(Duration),
    /// Over budget for longer than the grace period: close with 1008.
    Close,
}

#[derive(Debug)]
pub struct RateLimit {
    messages: Bucket,
    bytes: Bucket,
    grace: Duration,
    last: Instant,
    /// When the connection went over budget and has not been back within it since.
    over_since: Option<Instant>,
}

impl RateLimit {
    pub fn new(
        messages_per_sec: u64,
        bytes_per_sec: u64,
        burst: Duration,
        grace: Duration,
    ) -> Self {
        RateLimit {
            messages: Bucket::new(messages_per_sec, burst),
            bytes: Bucket::new(bytes_per_sec, burst),
            grace,
            last: Instant::now(),
            over_since: None,
        }
    }

    /// A connection's limits as configured (`--rate-limit-*`).
    pub fn for_connection(config: &crate::config::Config) -> Self {
        RateLimit::new(
            config.rate_limit_messages,
            config.rate_limit_bytes,
            Duration::from_secs(config.rate_limit_burst_secs),
            Duration::from_secs(config.rate_limit_grace_secs),
        )
    }

    /// Accounts for `messages` received and `bytes` received or caused (sync answers).
    pub fn spend(&mut self, messages: usize, bytes: usize, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.messages.refill(elapsed);
        self.bytes.refill(elapsed);
        let wait = self
            .messages
            .spend(messages as f64)
            .max(self.bytes.spend(bytes as f64));
        if wait.is_zero() {
            self.over_since = None;
            return Verdict::Go;
        }
        let since = *self.over_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= self.grace {
            Verdict::Close
        } else {
            Verdict::Pause(wait)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_applies() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(
            10,
            1_000_000,
            Duration::from_secs(2),
            Duration::from_secs(5),
        );
        for _ in 0..20 {
            assert_eq!(r.spend(1, 10, t0), Verdict::Go);
        }
        assert_eq!(
            r.spend(1, 10, t0),
            Verdict::Pause(Duration::from_millis(100))
        );
        // Back within budget after a quiet second.
        assert_eq!(r.spend(1, 10, t0 + Duration::from_secs(1)), Verdict::Go);
    }

    #[test]
    fn one_huge_message_is_let_through_and_paid_back() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(100, 1000, Duration::from_secs(1), Duration::from_secs(5));
        assert_eq!(r.spend(1, 3000, t0), Verdict::Pause(Duration::from_secs(2)));
        assert_eq!(
            r.spend(1, 10, t0 + Duration::from_secs(2)),
            Verdict::Pause(Duration::from_millis(10))
        );
        assert_eq!(r.spend(1, 10, t0 + Duration::from_secs(3)), Verdict::Go);
    }

    #[test]
    fn staying_over_budget_past_the_grace_closes() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(
            10,
            1_000_000,
            Duration::from_secs(1),
            Duration::from_secs(2),
        );
        let mut t = t0;
        let mut verdict = Verdict::Go;
        for _ in 0..1000 {
            verdict = r.spend(1, 1, t);
            match verdict {
                Verdict::Pause(d) => t += d,
                Verdict::Go => {}
                Verdict::Close => break,
            }
        }
        assert_eq!(verdict, Verdict::Close);
        assert!(t >= t0 + Duration::from_secs(2));
    }
}
