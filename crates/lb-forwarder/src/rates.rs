//! The counters, sampled once a second, and the rates derived from them
//! (`tandemctl farm stats --rate`, like `ipvsadm -L --rate`: connections,
//! packets and bytes per second each way). The samples are also what the
//! metrics endpoint serves, so no scrape reads the kernel: whatever the
//! scrape rate, the counters are read once a second, over netlink.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_runtime::Shutdown;

use crate::nft;
use crate::ruleset::Count;

/// How often the counters are read.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// The window rates are averaged over (IPVS's estimator ticks every 2 s).
pub const RATE_WINDOW: Duration = Duration::from_secs(2);

/// One reading of every counter.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    pub counters: Arc<HashMap<String, Count>>,
}

/// Per second, over [`RATE_WINDOW`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    /// New connections.
    pub cps: f64,
    /// Packets and bytes from the clients.
    pub in_pps: f64,
    pub in_bps: f64,
    /// Packets and bytes to the clients.
    pub out_pps: f64,
    pub out_bps: f64,
}

impl std::ops::Add for Rates {
    type Output = Rates;
    fn add(self, o: Rates) -> Rates {
        Rates {
            cps: self.cps + o.cps,
            in_pps: self.in_pps + o.in_pps,
            in_bps: self.in_bps + o.in_bps,
            out_pps: self.out_pps + o.out_pps,
            out_bps: self.out_bps + o.out_bps,
        }
    }
}

/// The counter names of one backend: new connections, in, out.
#[derive(Debug, Clone)]
pub struct CounterNames {
    pub conn: String,
    pub inbound: String,
    pub outbound: String,
}

/// The rates of one backend between two readings `seconds` apart. A
/// counter that went backwards (a table replaced without carrying it over)
/// counts as 0.
pub fn rates_between(
    old: &HashMap<String, Count>,
    new: &HashMap<String, Count>,
    seconds: f64,
    names: &CounterNames,
) -> Rates {
    if seconds <= 0.0 {
        return Rates::default();
    }
    let delta = |name: &str| {
        let a = old.get(name).copied().unwrap_or_default();
        let b = new.get(name).copied().unwrap_or_default();
        (
            b.packets.saturating_sub(a.packets) as f64 / seconds,
            b.bytes.saturating_sub(a.bytes) as f64 / seconds,
        )
    };
    let (cps, _) = delta(&names.conn);
    let (in_pps, in_bps) = delta(&names.inbound);
    let (out_pps, out_bps) = delta(&names.outbound);
    Rates {
        cps,
        in_pps,
        in_bps,
        out_pps,
        out_bps,
    }
}

/// The recent samples.
#[derive(Debug, Default)]
pub struct Sampler {
    samples: Mutex<VecDeque<Sample>>,
    reads: std::sync::atomic::AtomicU64,
    failing: std::sync::atomic::AtomicBool,
}

impl Sampler {
    pub fn new() -> Arc<Sampler> {
        Arc::new(Sampler::default())
    }

    /// The newest sample, at most [`SAMPLE_EVERY`] old while the sampler
    /// runs and the kernel answers.
    pub fn latest(&self) -> Option<Sample> {
        self.samples.lock().ok().and_then(|s| s.back().cloned())
    }

    /// Counter readings so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Rates of one backend over the window (or what the samples cover, at
    /// least one interval); zero before two samples exist.
    pub fn rates(&self, names: &CounterNames) -> Rates {
        let Ok(s) = self.samples.lock() else {
            return Rates::default();
        };
        let Some(new) = s.back() else {
            return Rates::default();
        };
        let old = s
            .iter()
            .find(|o| new.at.duration_since(o.at) >= RATE_WINDOW)
            .or_else(|| s.front())
            .filter(|o| o.at < new.at);
        match old {
            Some(old) => rates_between(
                &old.counters,
                &new.counters,
                new.at.duration_since(old.at).as_secs_f64(),
                names,
            ),
            None => Rates::default(),
        }
    }

    fn push(&self, sample: Sample) {
        if let Ok(mut s) = self.samples.lock() {
            s.push_back(sample);
            while s.len() > 1
                && s.back()
                    .zip(s.front())
                    .is_some_and(|(b, f)| b.at.duration_since(f.at) > RATE_WINDOW + SAMPLE_EVERY)
            {
                s.pop_front();
            }
        }
    }
}

/// Reads the counters every [`SAMPLE_EVERY`] until shutdown. A failing
/// read is logged once, and again when it works again.
pub async fn run(sampler: Arc<Sampler>, mut shutdown: Shutdown) {
    use std::sync::atomic::Ordering;
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.wait() => return,
        }
        match nft::read_counters().await {
            Ok(c) => {
                sampler.reads.fetch_add(1, Ordering::Relaxed);
                if sampler.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("nftables counters readable again");
                }
                sampler.push(Sample {
                    at: Instant::now(),
                    counters: Arc::new(c),
                });
            }
            Err(e) => {
                if !sampler.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "cannot read the nftables counters (rates and metrics stay at their last values until this works again): {e}"
                    );
                }
            }
        }
    }
}
