//! Asking for durability and releasing what a flush covered: the `Flush` and `Release` steps of
//! the path of an update (ARCHITECTURE.md).

use std::time::{Duration, Instant};

use actix::prelude::*;

use super::pace::thread_cpu_time;
use super::{DocActor, Pending};
use crate::telemetry::METRICS;

/// However idle the thread looks, an inline flush needs at least this much quiet before it.
const MIN_IDLE_FOR_INLINE: Duration = Duration::from_micros(500);

/// From this many connections a delivery's cost is read off the thread's CPU clock. That read
/// is a system call, not a vDSO one (2.6 % of the server's CPU in rooms-2500x4, two per edit);
/// a delivery to fewer takes tens of µs, which a preemption rarely lands in, so its wall time
/// serves.
const CPU_CLOCK_FROM: usize = 16;

impl DocActor {
    /// Asks for a flush covering every pending entry, unless one is in flight (its completion
    /// asks again for whatever arrived meanwhile). While this document's broadcasts are over
    /// their share of the thread (`pace.rs`) the flush waits, counted as in flight, and then
    /// covers everything that arrived meanwhile.
    pub(super) fn request_flush(&mut self, ctx: &mut Context<Self>) {
        if self.flushing.is_some() || self.pending.is_empty() {
            return;
        }
        let share = self.registry.config().max_send_share;
        match self.send_budget.wait(Instant::now(), share) {
            Some(wait) => {
                METRICS.broadcasts_paced.inc();
                // In flight as far as stopping and deleting are concerned; recounted at start.
                self.flushing = Some(0);
                ctx.run_later(wait, |act, ctx| {
                    act.flushing = None;
                    act.start_flush(ctx);
                });
            }
            None => self.start_flush(ctx),
        }
    }

    /// Only `flushed` drains `pending`, and it cannot run while a hold is armed, so there is
    /// always something to flush here.
    fn start_flush(&mut self, ctx: &mut Context<Self>) {
        // A flush covers what was pending when it was asked for: far fewer than 2^32 entries.
        self.flushing = Some(self.pending.len() as u32);
        if let Some(cluster) = self.registry.cluster().cloned() {
            let name = self.name.clone();
            ctx.spawn(
                async move { cluster.flush(&name).await.map_err(|e| e.to_string()) }
                    .into_actor(self)
                    .map(|result, act, ctx| act.flushed(result, ctx)),
            );
            return;
        }
        let flusher = self.registry.flusher();
        let name = self.name.clone();
        let idle = self.idle_enough_to_flush_inline();
        ctx.spawn(
            async move { flusher.flush(&name, idle).await.map_err(|e| e.to_string()) }
                .into_actor(self)
                .map(|result, act, ctx| act.flushed(result, ctx)),
        );
    }

    /// An inline flush stalls this thread for the fsync's wall time (0.1–0.3 ms here), so it
    /// is only worth it while the thread idles at least as long as it spends sending: quiet
    /// for as long as the last delivery took, and for at least `MIN_IDLE_FOR_INLINE`. At 1,000
    /// readers (4.4 ms of sends per update, 0.6 ms quiet) an inline flush made the server fall
    /// behind; at 50 readers and 1,000 edits/s (0.3 ms of sends, 0.7 ms quiet) it saves two
    /// thread wake-ups per update.
    fn idle_enough_to_flush_inline(&self) -> bool {
        self.send_budget.quiet(Instant::now(), MIN_IDLE_FOR_INLINE)
    }

    pub(super) fn flushed(&mut self, result: Result<(), String>, ctx: &mut Context<Self>) {
        let covered = self.flushing.take().unwrap_or(0);
        if let Err(e) = result {
            self.fail(format!("storage flush failed: {e}"), ctx);
            return;
        }
        let durable: Vec<Pending> = self.pending.drain(..covered as usize).collect();
        let changed = durable.iter().any(|p| matches!(p, Pending::Update(..)));
        let share = self.registry.config().max_send_share;
        let started = Instant::now();
        let cpu = (share < 100 && self.conns.len() >= CPU_CLOCK_FROM).then(thread_cpu_time);
        self.deliver(durable, ctx);
        let now = Instant::now();
        let took = now - started;
        let cost = cpu.map_or(took, |cpu| thread_cpu_time().saturating_sub(cpu));
        self.send_budget.spend(cost, took, now, share);
        if changed {
            self.changed_durably(ctx);
        }
        self.request_flush(ctx);
        self.maybe_compact(ctx);
    }
}
