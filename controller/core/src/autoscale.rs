//! How many warm instances a pool with `autoscale` keeps: one pure decision from the declared
//! policy and what the engine observed (arrivals, the measured fill time, bound instances,
//! open schedule windows), and the scale-down brake that keeps it from flapping.
//!
//! The rule: the pool keeps the largest of what each policy asks for (`warm`, `min`, the
//! buffer, every open schedule, demand), capped at `autoscale.max`. `warm` alone keeps meaning
//! what it always meant: it is one of the floors.

/// Which policy decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Policy {
    Warm,
    Min,
    Buffer,
    Schedule,
    Demand,
}

impl Policy {
    pub fn label(self) -> &'static str {
        match self {
            Policy::Warm => "warm",
            Policy::Min => "min",
            Policy::Buffer => "buffer",
            Policy::Schedule => "schedule",
            Policy::Demand => "demand",
        }
    }
}

/// What the decision reads: the declared policy, resolved, and what was observed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Inputs {
    /// `spec.warm`.
    pub warm: u32,
    pub min: u32,
    /// `autoscale.max` (or the pool's max).
    pub max: u32,
    /// The buffer's ready instances above the bound ones, already resolved against `bound`.
    pub buffer: Option<u32>,
    /// The largest `warm` of the schedule windows open now (or opening within a fill time).
    pub schedule: Option<u32>,
    /// `demand.hitRate`, when demand is declared.
    pub hit_rate: Option<f64>,
    /// Claims per second, as observed over the demand window.
    pub arrival_rate: f64,
    /// Seconds from asking for an instance to its being ready, as measured.
    pub fill_time_s: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Warm instances to keep.
    pub desired: u32,
    pub policy: Policy,
    pub reason: String,
    /// What the policy asked for when `max` held it back.
    pub limited_from: Option<u32>,
}

/// The smallest `k` such that a Poisson variable of mean `mu` is below `k` with probability
/// at least `p`: with `k` warm and each bound one refilled within a fill time, a claim finds a
/// warm instance unless `k` or more others arrived within that fill time.
pub fn warm_for_hit_rate(mu: f64, p: f64) -> u32 {
    // (NaN included.)
    if mu.is_nan() || p.is_nan() || mu <= 0.0 || p <= 0.0 {
        return 0;
    }
    let p = p.min(0.999_999);
    // Beyond any pool (ten million claims in one fill time) the normal approximation.
    if mu > 1e7 {
        let z = normal_quantile(p);
        return (mu + z * mu.sqrt()).ceil().min(f64::from(u32::MAX - 1)) as u32 + 1;
    }
    // The probabilities relative to the mode's, from the mode down and up (no e^-mu, which
    // underflows, and loses its precision as a subnormal number, from mu ~ 708): exact, so
    // the answer never falls as mu grows. Terms under 1e-20 of the mode's are left out.
    const NEGLIGIBLE: f64 = 1e-20;
    let mode = mu.floor();
    let mut below = Vec::new(); // j = mode - 1, mode - 2, ...
    let (mut w, mut j) = (1.0f64, mode);
    while j > 0.0 {
        w *= j / mu;
        if w < NEGLIGIBLE {
            break;
        }
        below.push(w);
        j -= 1.0;
    }
    let mut above = Vec::new(); // j = mode + 1, mode + 2, ...
    let (mut w, mut j) = (1.0f64, mode);
    loop {
        w *= mu / (j + 1.0);
        if w < NEGLIGIBLE {
            break;
        }
        above.push(w);
        j += 1.0;
    }
    let total = below.iter().sum::<f64>() + 1.0 + above.iter().sum::<f64>();
    let target = p * total;
    // P(N <= j) >= p first at j: k = j + 1.
    let lowest = mode - below.len() as f64;
    let weights = below
        .iter()
        .rev()
        .chain(std::iter::once(&1.0))
        .chain(above.iter());
    let mut cumulative = 0.0;
    for (i, w) in weights.enumerate() {
        cumulative += w;
        if cumulative >= target {
            return (lowest + i as f64) as u32 + 1;
        }
    }
    (mode + above.len() as f64) as u32 + 1
}

/// The standard normal quantile (Acklam's rational approximation, |error| < 1.2e-9).
fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// Desired warm instances, and which policy won.
pub fn decide(i: &Inputs) -> Decision {
    let mut best = (i.warm, Policy::Warm, format!("warm: {}", i.warm));
    let mut consider = |n: u32, policy: Policy, why: String| {
        if n > best.0 {
            best = (n, policy, why);
        }
    };
    consider(i.min, Policy::Min, format!("min: {}", i.min));
    if let Some(b) = i.buffer {
        consider(b, Policy::Buffer, format!("buffer: {b} above the bound"));
    }
    if let Some(s) = i.schedule {
        consider(s, Policy::Schedule, format!("schedule: a window wants {s}"));
    }
    if let Some(p) = i.hit_rate {
        let mu = i.arrival_rate * i.fill_time_s;
        let k = warm_for_hit_rate(mu, p);
        consider(
            k,
            Policy::Demand,
            format!(
                "demand: {:.3} claims/s x {:.1} s fill time -> {k} warm for {:.1}% hits",
                i.arrival_rate,
                i.fill_time_s,
                p * 100.0
            ),
        );
    }
    let (wanted, policy, mut reason) = best;
    let limited_from = (wanted > i.max).then_some(wanted);
    if let Some(w) = limited_from {
        reason = format!("{reason}; held at max {} (wanted {w})", i.max);
    }
    Decision {
        desired: wanted.min(i.max),
        policy,
        reason,
        limited_from,
    }
}

/// The brake on scale-down: a scale-up is taken at once; a scale-down waits `cooldown_ms`
/// after the last change and then removes at most `step` warm instances.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Brake {
    /// The target in force.
    pub target: Option<u32>,
    last_change_ms: u64,
    /// Scale-downs made (for the property that it never flaps).
    pub scale_downs: u64,
}

impl Brake {
    /// Starts a brake that has no target yet at the warm instances the pool has now (a
    /// restarted controller, a policy just added): a scale-down from there waits its cooldown
    /// like any other, rather than removing at once what the last decision kept.
    pub fn start_at(&mut self, now_ms: u64, current: u32) {
        if self.target.is_none() {
            self.target = Some(current);
            self.last_change_ms = now_ms;
        }
    }

    /// `max` is a hard ceiling: a target above it (max lowered) comes down to it at once.
    pub fn cap(&mut self, max: u32) {
        if let Some(t) = self.target
            && t > max
        {
            self.target = Some(max);
        }
    }

    /// The warm target at `now_ms` for `desired`.
    pub fn apply(&mut self, now_ms: u64, desired: u32, cooldown_ms: u64, step: u32) -> u32 {
        let Some(current) = self.target else {
            self.target = Some(desired);
            self.last_change_ms = now_ms;
            return desired;
        };
        if desired > current {
            self.target = Some(desired);
            self.last_change_ms = now_ms;
        } else if desired < current && now_ms.saturating_sub(self.last_change_ms) >= cooldown_ms {
            self.target = Some(current - (current - desired).min(step.max(1)));
            self.last_change_ms = now_ms;
            self.scale_downs += 1;
        }
        self.target.unwrap_or(desired)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn demand(rate: f64, fill: f64) -> Inputs {
        Inputs {
            max: 1000,
            hit_rate: Some(0.99),
            arrival_rate: rate,
            fill_time_s: fill,
            ..Inputs::default()
        }
    }

    #[test]
    fn warm_alone_means_what_it_always_meant() {
        let d = decide(&Inputs {
            warm: 4,
            max: 10,
            ..Inputs::default()
        });
        assert_eq!((d.desired, d.policy), (4, Policy::Warm));
    }

    #[test]
    fn the_largest_floor_wins_and_says_why() {
        let d = decide(&Inputs {
            warm: 2,
            min: 3,
            max: 100,
            buffer: Some(5),
            schedule: Some(40),
            ..Inputs::default()
        });
        assert_eq!((d.desired, d.policy), (40, Policy::Schedule));
        assert!(d.reason.contains("window"), "{}", d.reason);
    }

    #[test]
    fn max_holds_the_pool_back_and_says_from_what() {
        let d = decide(&Inputs {
            max: 10,
            schedule: Some(40),
            ..Inputs::default()
        });
        assert_eq!((d.desired, d.limited_from), (10, Some(40)));
        assert!(d.reason.contains("max 10"), "{}", d.reason);
    }

    #[test]
    fn demand_covers_the_claims_expected_in_one_fill_time() {
        // One claim a second, 3 s to refill: 3 expected; 99% of the time at most 8 arrive.
        let d = decide(&demand(1.0, 3.0));
        assert_eq!(d.policy, Policy::Demand);
        assert_eq!(d.desired, 9);
        assert!(d.reason.contains("99.0% hits"), "{}", d.reason);
        // No arrivals: demand asks for nothing.
        assert_eq!(decide(&demand(0.0, 3.0)).desired, 0);
    }

    #[test]
    fn the_poisson_quantile_matches_known_values_and_large_means() {
        // P(N <= 0 | mu = 0.01) = 0.990: one warm instance covers it.
        assert_eq!(warm_for_hit_rate(0.01, 0.99), 1);
        // P(N <= 5 | mu = 2) = 0.983 < 0.99 <= P(N <= 6) = 0.9955.
        assert_eq!(warm_for_hit_rate(2.0, 0.99), 7);
        let big = warm_for_hit_rate(10_000.0, 0.99);
        assert!((10_200..10_260).contains(&big), "{big}");
    }

    #[test]
    fn the_quantile_never_falls_as_the_mean_grows_across_the_underflow_of_e_to_the_minus_mu() {
        // Found by `monotone_in_demand`: at mu 743 (e^-743 is a subnormal number, nearly no
        // precision left) the term-by-term sum gave more than at mu 884.
        let hit = 0.876_604_098_391_271_4;
        let (low, high) = (
            28.657_053_224_365_246 * 25.934_391_283_659_018,
            34.111_303_418_606_92 * 25.934_391_283_659_018,
        );
        assert!(warm_for_hit_rate(high, hit) >= warm_for_hit_rate(low, hit));
        let mut last = 0;
        for tenth in 6_500..7_600 {
            let k = warm_for_hit_rate(f64::from(tenth) / 10.0, 0.999);
            assert!(k >= last, "mu {}: {k} < {last}", f64::from(tenth) / 10.0);
            last = k;
        }
    }

    #[test]
    fn a_brake_started_at_what_the_pool_has_waits_before_removing_it() {
        let mut b = Brake::default();
        // A restarted controller finds 9 warm; nothing observed yet asks for 1.
        b.start_at(0, 9);
        assert_eq!(b.apply(0, 1, 60_000, 1), 9);
        assert_eq!(b.apply(59_999, 1, 60_000, 1), 9);
        assert_eq!(b.apply(60_000, 1, 60_000, 1), 8);
        // Started once: later calls change nothing.
        b.start_at(60_000, 30);
        assert_eq!(b.target, Some(8));
        // A rise is still taken at once.
        assert_eq!(b.apply(60_001, 12, 60_000, 1), 12);
    }

    #[test]
    fn a_lowered_max_brings_the_target_down_at_once() {
        let mut b = Brake::default();
        assert_eq!(b.apply(0, 50, 60_000, 1), 50);
        b.cap(10);
        assert_eq!(b.apply(1, 10, 60_000, 1), 10);
        b.cap(20);
        assert_eq!(b.target, Some(10), "a higher cap raises nothing");
    }

    #[test]
    fn a_scale_up_is_taken_at_once_and_a_scale_down_waits_and_steps() {
        let mut b = Brake::default();
        assert_eq!(b.apply(0, 10, 60_000, 2), 10);
        assert_eq!(b.apply(1_000, 20, 60_000, 2), 20);
        // Lower, but within the cooldown of the scale-up: held.
        assert_eq!(b.apply(30_000, 5, 60_000, 2), 20);
        // Then two at a time, one cooldown apart.
        assert_eq!(b.apply(61_000, 5, 60_000, 2), 18);
        assert_eq!(b.apply(62_000, 5, 60_000, 2), 18);
        assert_eq!(b.apply(121_000, 5, 60_000, 2), 16);
        assert_eq!(b.scale_downs, 2);
    }

    proptest! {
        #[test]
        fn never_above_max_nor_below_min(
            warm in 0u32..50, min in 0u32..50, max in 0u32..200, buffer in proptest::option::of(0u32..300),
            schedule in proptest::option::of(0u32..300), rate in 0.0f64..100.0, fill in 0.0f64..30.0,
        ) {
            let min = min.min(max);
            let d = decide(&Inputs {
                warm, min, max, buffer, schedule, hit_rate: Some(0.99), arrival_rate: rate,
                fill_time_s: fill,
            });
            prop_assert!(d.desired <= max);
            prop_assert!(d.desired >= min);
        }

        #[test]
        fn monotone_in_demand(rate in 0.0f64..50.0, more in 0.0f64..50.0, fill in 0.1f64..30.0,
                              hit in 0.5f64..0.999) {
            let mut i = demand(rate, fill);
            i.hit_rate = Some(hit);
            let low = decide(&i).desired;
            i.arrival_rate = rate + more;
            prop_assert!(decide(&i).desired >= low);
        }

        #[test]
        fn random_arrival_traces_never_make_it_flap(
            rates in proptest::collection::vec(0.0f64..20.0, 3600),
        ) {
            // One decision a second for an hour, demand swinging at random: scale-downs are
            // at most one per cooldown (60 per hour at 60 s).
            let mut b = Brake::default();
            for (s, rate) in rates.iter().enumerate() {
                let want = decide(&demand(*rate, 3.0)).desired;
                let before = b.target;
                let target = b.apply(s as u64 * 1000, want, 60_000, 1);
                // A scale-up is never braked.
                if before.is_none_or(|t| want >= t) {
                    prop_assert_eq!(target, want);
                }
            }
            prop_assert!(b.scale_downs <= 60, "{} scale-downs in an hour", b.scale_downs);
        }
    }
}
