//! The schedulers' decisions as pure functions: the loads and settings in,
//! the order in which backends take the next connections out. No kernel, no
//! clock: [`crate::ruleset`] turns the result into nftables maps.
//!
//! - [`maglev`]: the lookup table of Maglev hashing (`mh`), the same on
//!   every node for the same backends and seed.
//! - [`greedy`]: the next connections of the load-aware schedulers (`lc`,
//!   `wlc`, `sed`, `nq`, `ovf`) and of any scheduler with connection
//!   thresholds, each pick counted as one more connection, as IPVS would
//!   decide them one at a time.
//! - [`overloaded`]: the `-x`/`-y` hysteresis of connection thresholds.

use tandem_config::Scheduler;

/// Connections of one backend: active (TCP being opened or ESTABLISHED,
/// and every UDP flow) and inactive (a TCP connection being closed:
/// FIN_WAIT, CLOSE_WAIT, LAST_ACK). TIME_WAIT and CLOSE count as closed.
/// (See [`crate::conns::classify`] for how this differs from IPVS.)
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    pub active: u64,
    pub inactive: u64,
}

impl Load {
    /// Every open connection: what thresholds compare.
    pub fn total(&self) -> u64 {
        self.active + self.inactive
    }

    /// IPVS's overhead of least-connection scheduling: an active connection
    /// weighs 256 inactive ones.
    fn overhead(&self) -> u64 {
        self.active * 256 + self.inactive
    }
}

/// A backend as [`greedy`] sees it, in configuration order (ties go to the
/// first, as IPVS's list order decides them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub weight: u64,
    pub load: Load,
    /// Connections it may still take before its upper threshold; None
    /// without a threshold.
    pub room: Option<u64>,
}

/// The next picks of `scheduler` over `candidates` (indexes into it), at
/// most `max` of them, and whether they stopped because no backend could
/// take another (thresholds, or `ovf` with every backend full): then
/// connections beyond the last pick have no backend.
///
/// - `rr`/`wrr`: smooth weighted round robin over those with room (`rr`:
///   weights 1);
/// - `lc`: the least overhead (active × 256 + inactive);
/// - `wlc`: the least overhead / weight;
/// - `sed`: the least (active + 1) / weight;
/// - `nq`: the first idle backend (no active connection), else as `sed`;
/// - `ovf`: the highest weight with fewer open connections (active and
///   being closed) than its weight;
/// - `fo`: the highest weight;
/// - hash schedulers do not schedule in sequence: they get nothing.
pub fn greedy(scheduler: Scheduler, candidates: &[Candidate], max: usize) -> (Vec<usize>, bool) {
    let mut c: Vec<Candidate> = candidates.to_vec();
    let mut picks = Vec::with_capacity(max.min(4096));
    // Smooth weighted round robin's running scores.
    let mut current = vec![0i128; c.len()];
    while picks.len() < max {
        let open: Vec<usize> = (0..c.len())
            .filter(|&i| c[i].room != Some(0) && c[i].weight > 0)
            .collect();
        let pick = match scheduler {
            Scheduler::Rr | Scheduler::Wrr => {
                let w = |i: usize| {
                    if scheduler == Scheduler::Rr {
                        1
                    } else {
                        i128::from(c[i].weight)
                    }
                };
                let total: i128 = open.iter().map(|&i| w(i)).sum();
                let mut best: Option<usize> = None;
                for &i in &open {
                    current[i] += w(i);
                    if best.is_none_or(|b| current[i] > current[b]) {
                        best = Some(i);
                    }
                }
                if let Some(b) = best {
                    current[b] -= total;
                }
                best
            }
            Scheduler::Lc => min_by(&open, |i| (u128::from(c[i].load.overhead()), 1)),
            Scheduler::Wlc => min_by(&open, |i| {
                (u128::from(c[i].load.overhead()), u128::from(c[i].weight))
            }),
            Scheduler::Sed => min_by(&open, |i| {
                (u128::from(c[i].load.active + 1), u128::from(c[i].weight))
            }),
            Scheduler::Nq => open
                .iter()
                .copied()
                .find(|&i| c[i].load.active == 0)
                .or_else(|| {
                    min_by(&open, |i| {
                        (u128::from(c[i].load.active + 1), u128::from(c[i].weight))
                    })
                }),
            // Connections being opened count: they are about to be active.
            Scheduler::Ovf => max_weight(
                &open
                    .iter()
                    .copied()
                    .filter(|&i| c[i].load.total() < c[i].weight)
                    .collect::<Vec<_>>(),
                &c,
            ),
            Scheduler::Fo => max_weight(&open, &c),
            Scheduler::Sh | Scheduler::Dh | Scheduler::Mh => return (Vec::new(), false),
        };
        let Some(p) = pick else {
            return (picks, true);
        };
        c[p].load.active += 1;
        if let Some(r) = c[p].room.as_mut() {
            *r -= 1;
        }
        picks.push(p);
    }
    (picks, false)
}

/// The first index with the least `num / den` (compared exactly).
fn min_by(open: &[usize], ratio: impl Fn(usize) -> (u128, u128)) -> Option<usize> {
    let mut best: Option<(usize, u128, u128)> = None;
    for &i in open {
        let (n, d) = ratio(i);
        if best.is_none_or(|(_, bn, bd)| n * bd < bn * d) {
            best = Some((i, n, d));
        }
    }
    best.map(|(i, _, _)| i)
}

/// The first index with the highest weight.
fn max_weight(open: &[usize], c: &[Candidate]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for &i in open {
        if best.is_none_or(|b| c[i].weight > c[b].weight) {
            best = Some(i);
        }
    }
    best
}

/// Connection thresholds of one backend (`ipvsadm -x`, `-y`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub upper: u64,
    /// None: readmitted below three quarters of `upper`, as IPVS does.
    pub lower: Option<u64>,
}

/// Whether a backend is overloaded now, given whether it was: it becomes
/// overloaded at `upper` connections and stays so until it is down to
/// `lower` (IPVS's hysteresis).
pub fn overloaded(was: bool, total: u64, t: Thresholds) -> bool {
    if total >= t.upper {
        return true;
    }
    if !was {
        return false;
    }
    match t.lower {
        Some(lower) => total > lower,
        None => total * 4 >= t.upper * 3,
    }
}

/// The smallest prime not below `n` (and at least 2).
pub fn prime_at_least(n: u64) -> u64 {
    let mut p = n.max(2);
    loop {
        if (2..)
            .take_while(|d| d * d <= p)
            .all(|d| !p.is_multiple_of(d))
        {
            return p;
        }
        p += 1;
    }
}

/// The size of a Maglev table for a farm of `backends` configured
/// backends: the smallest prime ≥ 100 × backends (101 at least). It
/// depends on the configured backends, not on those in rotation, so a
/// backend leaving the rotation does not resize the table.
pub fn maglev_size(backends: usize) -> u64 {
    prime_at_least(100 * (backends.max(1) as u64))
}

/// A 64-bit hash of `key` with `seed` and a `salt` telling the two
/// permutation hashes apart: FNV-1a, then the splitmix64 finaliser for
/// avalanche. Fixed here (not std's randomised hasher) because every node,
/// in every release, must build the same table.
pub fn hash64(seed: u32, salt: u8, key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in [salt]
        .iter()
        .chain(seed.to_le_bytes().iter())
        .chain(key.as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Maglev hashing's lookup table (Eisenbud et al., NSDI 2016, §3.4): each
/// backend walks its own permutation of the `size` slots (offset and skip
/// from hashes of its key and `seed`) and, in turns, takes the next slot
/// still free; a backend of weight w takes w turns per round (weights
/// divided by their greatest common divisor), as IPVS's mh does. `size`
/// must be prime and larger than the number of backends. Returns, for each
/// slot, the index of its backend in `backends`; empty when `backends` is.
///
/// The property that matters: removing a backend frees its slots, and the
/// others' permutations fill them, so nearly every other slot keeps its
/// backend (the tests bound the rest).
pub fn maglev(backends: &[(String, u64)], size: u64, seed: u32) -> Vec<usize> {
    if backends.is_empty() || size < 2 {
        return Vec::new();
    }
    // A walk covers every slot only when the size is prime: a composite
    // one (a caller's mistake) would never finish filling the table.
    let size = prime_at_least(size);
    let m = size as usize;
    let perm: Vec<(u64, u64)> = backends
        .iter()
        .map(|(key, _)| {
            let offset = hash64(seed, 1, key) % size;
            let skip = hash64(seed, 2, key) % (size - 1) + 1;
            (offset, skip)
        })
        .collect();
    let g = backends.iter().map(|(_, w)| (*w).max(1)).fold(0, gcd);
    let turns: Vec<u64> = backends.iter().map(|(_, w)| (*w).max(1) / g).collect();
    let mut next = vec![0u64; backends.len()];
    let mut table: Vec<Option<usize>> = vec![None; m];
    let mut filled = 0;
    'fill: loop {
        for (i, (offset, skip)) in perm.iter().enumerate() {
            for _ in 0..turns[i] {
                let mut c = ((offset + next[i] * skip) % size) as usize;
                while table[c].is_some() {
                    next[i] += 1;
                    c = ((offset + next[i] * skip) % size) as usize;
                }
                table[c] = Some(i);
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
    }
    table.into_iter().map(|s| s.unwrap_or(0)).collect()
}

/// Maglev for backends leaving the rotation: the table of every
/// configured backend ([`maglev`]), in which each slot of a backend that
/// cannot take connections (`available[i]` false) goes to the available
/// backend whose permutation reaches that slot first (its rank divided by
/// its weight). No other slot changes, so a backend leaving the rotation
/// moves only its own clients, and the same set of absent backends gives
/// the same table whatever the order they left in. Empty when none is
/// available.
pub fn maglev_with_absent(
    backends: &[(String, u64)],
    available: &[bool],
    size: u64,
    seed: u32,
) -> Vec<usize> {
    let up: Vec<usize> = (0..backends.len())
        .filter(|&i| available.get(i).copied().unwrap_or(false))
        .collect();
    if up.is_empty() || size < 2 {
        return Vec::new();
    }
    let size = prime_at_least(size);
    let base = maglev(backends, size, seed);
    // Slot c is step k of backend j's walk when offset + k × skip ≡ c
    // (mod size): k = (c - offset) × skip⁻¹, size being prime.
    let walks: Vec<(u64, u64, u64)> = up
        .iter()
        .map(|&j| {
            let key = &backends[j].0;
            let offset = hash64(seed, 1, key) % size;
            let skip = hash64(seed, 2, key) % (size - 1) + 1;
            (offset, inverse_mod(skip, size), backends[j].1.max(1))
        })
        .collect();
    base.into_iter()
        .enumerate()
        .map(|(c, owner)| {
            if available.get(owner).copied().unwrap_or(false) {
                return owner;
            }
            let c = c as u64;
            let mut best: Option<(usize, u128, u128)> = None;
            for (n, (offset, inv, w)) in walks.iter().enumerate() {
                let rank =
                    u128::from((c + size - offset) % size) * u128::from(*inv) % u128::from(size);
                let w = u128::from(*w);
                // rank / w, compared exactly.
                if best.is_none_or(|(_, r, bw)| rank * bw < r * w) {
                    best = Some((n, rank, w));
                }
            }
            best.map_or(up[0], |(n, _, _)| up[n])
        })
        .collect()
}

/// a⁻¹ modulo the prime p (Fermat: a^(p-2)).
fn inverse_mod(a: u64, p: u64) -> u64 {
    let (mut base, mut exp, mut acc) = (u128::from(a % p), p - 2, 1u128);
    let m = u128::from(p);
    while exp > 0 {
        if exp & 1 == 1 {
            acc = acc * base % m;
        }
        base = base * base % m;
        exp >>= 1;
    }
    acc as u64
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(weight: u64, active: u64) -> Candidate {
        Candidate {
            weight,
            load: Load {
                active,
                inactive: 0,
            },
            room: None,
        }
    }

    #[test]
    fn primes() {
        assert_eq!(prime_at_least(500), 503);
        assert_eq!(prime_at_least(100), 101);
        assert_eq!(maglev_size(5), 503);
        assert_eq!(maglev_size(0), 101);
    }

    #[test]
    fn modular_inverse() {
        for a in [1, 2, 100, 502] {
            assert_eq!(a * inverse_mod(a, 503) % 503, 1);
        }
    }

    #[test]
    fn gcd_of_weights() {
        assert_eq!(gcd(12, 18), 6);
        assert_eq!(gcd(0, 7), 7);
    }

    #[test]
    fn lc_fills_the_emptiest_first() {
        let (p, done) = greedy(Scheduler::Lc, &[cand(1, 2), cand(1, 0)], 4);
        assert_eq!(p, [1, 1, 0, 1]);
        assert!(!done);
    }
}
