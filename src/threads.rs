//! How many threads llama.cpp computes with, when the user did not say (`-t`).
//!
//! ggml's CPU threads meet at a spinning barrier after every graph node. When
//! another process holds a core, one of our threads waits for its time slice
//! while the others spin, and decode collapses (measured on 2 cores with one
//! busy process: 0.4 tok/s with 2 threads, 44.5 with 1). So the thread count
//! starts from the cores that are free now and then follows what the decode
//! timings say: the tuner times each call, and now and then tries a
//! neighbouring count, rarely enough that trying a bad one costs a few percent.

use std::time::{Duration, Instant};

/// Threads for one kind of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// Exactly this many (`-t N`).
    Fixed(usize),
    /// Chosen and adjusted at run time, at most this many.
    Auto { max: usize },
}

impl Threads {
    /// The default: automatic, up to the physical cores this process may use.
    pub fn auto() -> Threads {
        Threads::Auto {
            max: crate::hardware::usable_cores(),
        }
    }

    /// The count to start with.
    pub fn initial(self) -> usize {
        match self {
            Threads::Fixed(n) => n.max(1),
            Threads::Auto { max } => crate::hardware::free_cores().clamp(1, max.max(1)),
        }
    }
}

impl std::fmt::Display for Threads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Threads::Fixed(n) => write!(f, "{n}"),
            Threads::Auto { max } => write!(f, "auto (1-{max})"),
        }
    }
}

/// What the tuner knows about one thread count.
#[derive(Debug, Clone, Copy, Default)]
struct Arm {
    /// Smoothed seconds per token; `None` until measured.
    cost: Option<f64>,
    /// Duration of its last call, which sets how long until it is tried again.
    last_call: f64,
    /// When it was last measured.
    seen: Option<Instant>,
}

/// Picks a thread count for repeated calls of one kind (single-token decode,
/// or batches) from their timings.
#[derive(Debug, Clone)]
pub struct ThreadTuner {
    max: usize,
    current: usize,
    /// When `current` was chosen.
    since: Instant,
    arms: Vec<Arm>,
    /// The count tried for the call in flight, if it is not `current`.
    probing: Option<usize>,
    /// Other processes running, smoothed over calls (None: unknown).
    others: Option<f64>,
}

/// Weight of a new timing in the smoothed cost.
const SMOOTHING: f64 = 0.3;
/// A count whose last call took `c` seconds is retried after `PATIENCE * c`:
/// retrying a bad count then costs about 1/PATIENCE of the time.
const PATIENCE: f64 = 25.0;
/// Bounds on the time between two tries of one count.
const MIN_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(30);
/// Switch only to a count this much faster (timings are noisy).
const MARGIN: f64 = 0.9;

impl ThreadTuner {
    pub fn new(initial: usize, max: usize, now: Instant) -> ThreadTuner {
        let max = max.max(1);
        ThreadTuner {
            max,
            current: initial.clamp(1, max),
            since: now,
            arms: vec![Arm::default(); max + 1],
            probing: None,
            others: None,
        }
    }

    /// The thread count for the next call. `others_running` is how many
    /// other tasks are runnable right now, if known (one noisy reading, taken
    /// between calls while this process's compute threads sleep): more
    /// threads are tried only while that many cores look free, since a thread
    /// that has to share a core makes every barrier wait for it.
    pub fn next(&mut self, now: Instant, others_running: Option<usize>) -> usize {
        self.probing = None;
        if let Some(o) = others_running {
            let o = o as f64;
            self.others = Some(self.others.map_or(o, |s| s + 0.2 * (o - s)));
        }
        let free = self
            .others
            .map_or(self.max, |o| self.max.saturating_sub(o.round() as usize));
        if self.arms[self.current].cost.is_none() {
            return self.current;
        }
        for n in self.neighbours() {
            if n > self.current && n > free.max(1) {
                continue;
            }
            let arm = self.arms[n];
            let due = match arm.seen {
                None => now.duration_since(self.since) >= MIN_RETRY,
                Some(seen) => {
                    let wait = Duration::from_secs_f64(PATIENCE * arm.last_call)
                        .clamp(MIN_RETRY, MAX_RETRY);
                    now.duration_since(seen) >= wait
                }
            };
            if due {
                self.probing = Some(n);
                return n;
            }
        }
        self.current
    }

    /// Records that a call with `n` threads took `secs` for `tokens` tokens.
    pub fn record(&mut self, n: usize, tokens: usize, secs: f64, now: Instant) {
        if n == 0 || n > self.max || tokens == 0 {
            return;
        }
        let probe = self.probing.take() == Some(n);
        let per_token = secs / tokens as f64;
        let arm = &mut self.arms[n];
        arm.cost = Some(match arm.cost {
            // A try replaces the old figure, which may be from another load.
            Some(c) if !probe => c + SMOOTHING * (per_token - c),
            _ => per_token,
        });
        arm.last_call = secs;
        arm.seen = Some(now);
        // Move to the fastest of the current count and its neighbours, as last measured.
        let cost = |m: usize| self.arms[m].cost.unwrap_or(f64::INFINITY);
        let best = self
            .neighbours()
            .into_iter()
            .min_by(|&a, &b| cost(a).total_cmp(&cost(b)));
        if let Some(m) = best {
            if cost(m) < MARGIN * cost(self.current) {
                self.current = m;
                self.since = now;
            }
        }
    }

    /// The count the tuner settled on so far.
    pub fn current(&self) -> usize {
        self.current
    }

    fn neighbours(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(2);
        if self.current > 1 {
            out.push(self.current - 1);
        }
        if self.current < self.max {
            out.push(self.current + 1);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a tuner against a cost model for `seconds` of simulated time and
    /// returns the time spent per token relative to the best fixed count.
    fn run(cost: impl Fn(usize) -> f64, initial: usize, max: usize, seconds: f64) -> (f64, usize) {
        let mut now = Instant::now();
        let mut t = ThreadTuner::new(initial, max, now);
        let (mut spent, mut tokens) = (0.0, 0usize);
        while spent < seconds {
            let n = t.next(now, None);
            let c = cost(n);
            spent += c;
            tokens += 1;
            now += Duration::from_secs_f64(c);
            t.record(n, 1, c, now);
        }
        let best = (1..=max).map(&cost).fold(f64::INFINITY, f64::min);
        (spent / tokens as f64 / best, t.current())
    }

    #[test]
    fn leaves_a_spinning_thread_count_that_is_100x_slower() {
        // 2 cores, one busy: 2 threads 2.5 s/token, 1 thread 22 ms/token.
        let cost = |n: usize| if n == 2 { 2.5 } else { 0.022 };
        let (ratio, settled) = run(cost, 2, 2, 120.0);
        assert_eq!(settled, 1);
        assert!(ratio < 1.15, "{ratio}");
    }

    #[test]
    fn finds_the_faster_count_when_the_machine_is_idle() {
        let cost = |n: usize| 0.030 / n as f64;
        let (ratio, settled) = run(cost, 1, 2, 30.0);
        assert_eq!(settled, 2);
        assert!(ratio < 1.1, "{ratio}");
    }

    #[test]
    fn climbs_to_the_best_of_many_cores() {
        // Best at 6 of 8 (memory-bound past that).
        let cost = |n: usize| 0.010 * (1.0 + (n as f64 - 6.0).abs() * 0.2);
        let (_, settled) = run(cost, 2, 8, 60.0);
        assert_eq!(settled, 6);
    }

    /// Two busy processes on two cores: the idle machine's two threads would
    /// be 25x slower; with the other processes seen, two are never tried.
    #[test]
    fn more_threads_are_not_tried_while_the_cores_are_busy() {
        let mut now = Instant::now();
        let mut t = ThreadTuner::new(1, 2, now);
        for _ in 0..2000 {
            let n = t.next(now, Some(2));
            assert_eq!(n, 1);
            now += Duration::from_millis(20);
            t.record(n, 1, 0.020, now);
        }
        // The load goes away: two threads are tried and kept.
        let mut twos = 0;
        for _ in 0..500 {
            let n = t.next(now, Some(0));
            let c = if n == 2 { 0.012 } else { 0.020 };
            twos += usize::from(n == 2);
            now += Duration::from_secs_f64(c);
            t.record(n, 1, c, now);
        }
        assert_eq!(t.current(), 2);
        assert!(twos > 400, "{twos}");
    }

    #[test]
    fn a_fixed_count_is_kept() {
        assert_eq!(Threads::Fixed(3).initial(), 3);
        assert_eq!(Threads::Fixed(0).initial(), 1);
    }
}
