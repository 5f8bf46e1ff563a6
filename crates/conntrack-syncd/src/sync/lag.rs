//! Replication lag, measured where one clock sees both ends: on the sending
//! node, from the kernel event (when the change was handed to the protocol)
//! to the acknowledgement of the datagram that carried it. The receiver
//! acknowledges after it applied the records, so this is "changed here" to
//! "applied there", plus half a round trip.

use std::cell::Cell;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Upper bounds of the histogram buckets, seconds (Prometheus `le`).
pub const LAG_BUCKETS_S: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Percentiles are over the samples of this last stretch of time.
pub const LAG_WINDOW: Duration = Duration::from_secs(10);
/// Samples kept for the percentiles (one per acknowledged datagram).
const MAX_SAMPLES: usize = 4096;

/// Lag samples: a histogram since start (for /metrics) and the recent
/// samples (for the percentiles in Status).
#[derive(Debug, Clone, Default)]
pub struct LagStats {
    /// (when acknowledged, lag, records it stands for)
    recent: VecDeque<(Instant, Duration, u32)>,
    /// Records per bucket of [`LAG_BUCKETS_S`] (not cumulative), then +Inf.
    buckets: [u64; LAG_BUCKETS_S.len() + 1],
    sum_s: f64,
    count: u64,
    /// The last percentiles computed.
    quantiles: Cell<Option<Quantiles>>,
}

/// Percentiles as computed at a time: (when, p50, p99).
type Quantiles = (Instant, Option<Duration>, Option<Duration>);

/// How old the percentiles in Status may be.
pub const QUANTILES_REFRESH: Duration = Duration::from_millis(250);

/// The histogram as Prometheus wants it.
#[derive(Debug, Clone, PartialEq)]
pub struct LagHistogram {
    pub sum_s: f64,
    pub count: u64,
    /// (upper bound in seconds, records in that bucket alone), +Inf last.
    pub buckets: Vec<(f64, u64)>,
}

impl LagStats {
    /// `records` records waited `lag` before the peer acknowledged them.
    pub fn record(&mut self, now: Instant, lag: Duration, records: u32) {
        let s = lag.as_secs_f64();
        let i = LAG_BUCKETS_S
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(LAG_BUCKETS_S.len());
        self.buckets[i] += u64::from(records);
        self.sum_s += s * f64::from(records);
        self.count += u64::from(records);
        if self.recent.len() >= MAX_SAMPLES {
            self.recent.pop_front();
        }
        self.recent.push_back((now, lag, records));
    }

    /// The `q` quantile (0..1) of the records acknowledged in the last
    /// [`LAG_WINDOW`], weighted by records; None without samples.
    pub fn quantile(&self, now: Instant, q: f64) -> Option<Duration> {
        self.quantile_within(now, LAG_WINDOW, q)
    }

    /// The median and the 99th percentile over [`LAG_WINDOW`], as of at
    /// most [`QUANTILES_REFRESH`] ago: Status is published every few
    /// milliseconds under load, and sorting thousands of samples each time
    /// would cost more than the replication it reports on.
    pub fn p50_p99(&self, now: Instant) -> (Option<Duration>, Option<Duration>) {
        if let Some((at, p50, p99)) = self.quantiles.get()
            && now.saturating_duration_since(at) < QUANTILES_REFRESH
            && at <= now
        {
            return (p50, p99);
        }
        let [p50, p99] = self.quantiles_within(now, LAG_WINDOW, [0.5, 0.99]);
        self.quantiles.set(Some((now, p50, p99)));
        (p50, p99)
    }

    /// The `q` quantile of the records acknowledged in the last `window`.
    pub fn quantile_within(&self, now: Instant, window: Duration, q: f64) -> Option<Duration> {
        let [lag] = self.quantiles_within(now, window, [q]);
        lag
    }

    /// Several quantiles of the records acknowledged in the last `window`,
    /// from one sort of the samples.
    fn quantiles_within<const N: usize>(
        &self,
        now: Instant,
        window: Duration,
        qs: [f64; N],
    ) -> [Option<Duration>; N] {
        let mut recent: Vec<(Duration, u32)> = self
            .recent
            .iter()
            .rev()
            .take_while(|(t, _, _)| now.saturating_duration_since(*t) <= window)
            .map(|(_, l, n)| (*l, *n))
            .collect();
        if recent.is_empty() {
            return [None; N];
        }
        recent.sort_unstable();
        let total: u64 = recent.iter().map(|(_, n)| u64::from(*n)).sum();
        qs.map(|q| {
            let rank = ((total as f64 * q).ceil() as u64).max(1);
            let mut seen = 0;
            for (lag, n) in &recent {
                seen += u64::from(*n);
                if seen >= rank {
                    return Some(*lag);
                }
            }
            recent.last().map(|(l, _)| *l)
        })
    }

    pub fn histogram(&self) -> LagHistogram {
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, n)| (LAG_BUCKETS_S.get(i).copied().unwrap_or(f64::INFINITY), *n))
            .collect();
        LagHistogram {
            sum_s: self.sum_s,
            count: self.count,
            buckets,
        }
    }
}

/// How replication is doing, as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HealthLevel {
    /// Replicating with the peer alive and the lag under the threshold
    /// (or still starting).
    Ok,
    /// Working but behind: lag above the threshold, or a resync from the
    /// peer not complete, for longer than `degraded_after`.
    Degraded,
    /// Not replicating: the peer is silent or refuses our datagrams.
    Failed,
}

impl HealthLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthLevel::Ok => "ok",
            HealthLevel::Degraded => "degraded",
            HealthLevel::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub level: HealthLevel,
    /// One sentence naming the problem ("" when OK).
    pub message: String,
}

impl Health {
    pub fn ok() -> Health {
        Health {
            level: HealthLevel::Ok,
            message: String::new(),
        }
    }
}

/// `1.8 s`, `250 ms`.
pub fn human(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_weighted_by_records_and_forget_old_samples() {
        let t0 = Instant::now();
        let mut l = LagStats::default();
        assert_eq!(l.quantile(t0, 0.5), None);
        l.record(t0, Duration::from_millis(1), 90);
        l.record(t0, Duration::from_millis(100), 10);
        assert_eq!(l.quantile(t0, 0.5), Some(Duration::from_millis(1)));
        assert_eq!(l.quantile(t0, 0.9), Some(Duration::from_millis(1)));
        assert_eq!(l.quantile(t0, 0.99), Some(Duration::from_millis(100)));
        let later = t0 + LAG_WINDOW + Duration::from_secs(1);
        l.record(later, Duration::from_millis(5), 1);
        assert_eq!(l.quantile(later, 0.99), Some(Duration::from_millis(5)));
        let h = l.histogram();
        assert_eq!(h.count, 101);
        // 1 ms lands in the 1 ms bucket, 5 ms in 5 ms, 100 ms in 100 ms.
        let at = |le: f64| h.buckets.iter().find(|(b, _)| *b == le).unwrap().1;
        assert_eq!(at(0.0005), 0);
        assert_eq!(at(0.001), 90);
        assert_eq!(at(0.005), 1);
        assert_eq!(at(0.1), 10);
        assert_eq!(h.buckets.last(), Some(&(f64::INFINITY, 0)));
        assert!((h.sum_s - (0.09 + 1.0 + 0.005)).abs() < 1e-9);
    }
}
