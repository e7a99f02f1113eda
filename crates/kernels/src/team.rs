//! A team of threads that works through a chain of dependent steps together: each thread
//! takes its share of every step and the team meets at a spinning barrier between steps.
//!
//! The theory network's full-batch step is a chain of L small products (32 × 512 × 512):
//! handing each product to rayon (as the `gemm` crate does) wakes and parks the pool's
//! threads hundreds of times a step, and that waking took about a fifth of the step's time
//! on 2 cores. A team spins instead: a barrier between two steps costs a few hundred
//! nanoseconds while the threads are on their cores, and falls back to yielding when they
//! are not (a loaded machine), so it never holds a core another thread needs for long.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How many spins a thread waits at a barrier before it starts to yield its core: a
/// `pause` takes 20–50 ns (AMD Zen 4, Intel Skylake and later), so about 0.1–0.2 ms, more
/// than the ranks of a balanced step drift apart, less than a block's product takes.
const SPINS_BEFORE_YIELD: u32 = 1 << 12;

/// A reusable barrier for a fixed number of threads that spins while it waits.
pub(crate) struct SpinBarrier {
    threads: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
}

impl SpinBarrier {
    fn new(threads: usize) -> Self {
        Self {
            threads,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
        }
    }

    /// The number of threads in the team.
    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Returns once every thread of the team has called `wait` as often as this one;
    /// what each thread wrote before its call is visible to every thread after it.
    pub(crate) fn wait(&self) {
        if self.threads <= 1 {
            return;
        }
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.threads {
            // The last to arrive: reset the count, then release the others (the release
            // store publishes the reset and every thread's writes, gathered by AcqRel).
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == generation {
            if spins < SPINS_BEFORE_YIELD {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// The number of threads for a team: rayon's (which `RAYON_NUM_THREADS` and the CLI's
/// `--threads` set), at most `max`, at least 1.
pub(crate) fn threads(max: usize) -> usize {
    rayon::current_num_threads().min(max).max(1)
}

/// Runs `work(rank, barrier)` on up to `threads` threads at once (this one and up to
/// `threads` − 1 scoped ones), rank 0..`barrier.threads()`, and returns when all have.
/// `work` must call `barrier.wait()` equally often on every rank, must split its work by
/// `barrier.threads()` (fewer than asked for when the system refuses a thread: the team
/// is then smaller, never stuck), and must not panic (a panicking rank would leave the
/// others waiting at the barrier).
pub(crate) fn run<F>(threads: usize, work: F)
where
    F: Fn(usize, &SpinBarrier) + Sync,
{
    run_spawning(threads, usize::MAX, work);
}

/// [`run`], spawning at most `max_helpers` threads (the tests' stand-in for a system that
/// refuses threads).
fn run_spawning<F>(threads: usize, max_helpers: usize, work: F)
where
    F: Fn(usize, &SpinBarrier) + Sync,
{
    let threads = threads.max(1);
    if threads == 1 {
        work(0, &SpinBarrier::new(1));
        return;
    }
    // The helpers start before the team's size is known (a spawn may fail): each waits
    // for the barrier, which is made once every spawn has been tried.
    let team: OnceLock<SpinBarrier> = OnceLock::new();
    std::thread::scope(|s| {
        let mut size = 1;
        for rank in 1..threads.min(max_helpers.saturating_add(1)) {
            let (work, team) = (&work, &team);
            let spawned = std::thread::Builder::new().spawn_scoped(s, move || {
                let barrier = loop {
                    match team.get() {
                        Some(b) => break b,
                        None => std::thread::yield_now(),
                    }
                };
                work(rank, barrier);
            });
            if spawned.is_err() {
                break;
            }
            size += 1;
        }
        let barrier = team.get_or_init(|| SpinBarrier::new(size));
        work(0, barrier);
    });
}

/// The `rank`-th of `parts` contiguous ranges that split 0..len, each start a multiple of
/// `align` (the last range takes the rest), so that ranks write whole cache lines.
pub(crate) fn share(len: usize, parts: usize, rank: usize, align: usize) -> std::ops::Range<usize> {
    let units = len.div_ceil(align);
    let (per, extra) = (units / parts, units % parts);
    let start = rank * per + rank.min(extra);
    let end = start + per + usize::from(rank < extra);
    (start * align).min(len)..(end * align).min(len)
}

/// A raw pointer that ranks share, each writing only the elements its share addresses.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);

impl SharedMut {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not its field).
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: the pointer is only dereferenced by ranks that write disjoint elements between
// two barrier waits (the callers' contract, stated where they write through it).
unsafe impl Send for SharedMut {}
// SAFETY: as for Send.
unsafe impl Sync for SharedMut {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn shares_cover_the_range_once_in_aligned_pieces() {
        for len in [0, 1, 15, 16, 17, 100, 512, 1000] {
            for parts in 1..=5 {
                let mut next = 0;
                for rank in 0..parts {
                    let r = share(len, parts, rank, 16);
                    assert_eq!(r.start, next, "len {len} parts {parts} rank {rank}");
                    assert!(r.start.is_multiple_of(16) || r.start == len);
                    next = r.end;
                }
                assert_eq!(next, len, "len {len} parts {parts}");
            }
        }
    }

    /// When only some helpers start, the team is that much smaller: every rank it has
    /// runs once, each sees the same team size, and nothing waits for a missing rank.
    #[test]
    fn a_refused_thread_makes_the_team_smaller() {
        for (asked, helpers) in [(4, 0), (4, 1), (4, 2), (3, 5)] {
            let ran: Vec<AtomicU64> = (0..asked).map(|_| AtomicU64::new(0)).collect();
            let sizes = AtomicU64::new(0);
            run_spawning(asked, helpers, |rank, barrier| {
                ran[rank].fetch_add(1, Ordering::Relaxed);
                sizes.fetch_add(barrier.threads() as u64, Ordering::Relaxed);
                barrier.wait();
                barrier.wait();
            });
            let size = asked.min(helpers + 1);
            let counts: Vec<u64> = ran.iter().map(|r| r.load(Ordering::Relaxed)).collect();
            let expected: Vec<u64> = (0..asked).map(|r| u64::from(r < size)).collect();
            assert_eq!(counts, expected, "{asked} asked, {helpers} helpers");
            assert_eq!(sizes.load(Ordering::Relaxed), (size * size) as u64);
        }
    }

    #[test]
    fn the_barrier_orders_every_step() {
        // Each step, every rank adds to its own slot, then (after the barrier) checks that
        // every slot holds the step's count: a rank that ran ahead would see a slot behind.
        // (Counted, not asserted inside: a panicking rank would leave the others waiting.)
        for threads in [1, 2, 3, 4] {
            let slots: Vec<AtomicU64> = (0..threads).map(|_| AtomicU64::new(0)).collect();
            let wrong = AtomicU64::new(0);
            run(threads, |rank, barrier| {
                wrong.fetch_add(u64::from(barrier.threads() != threads), Ordering::Relaxed);
                for step in 1..=500u64 {
                    slots[rank].fetch_add(1, Ordering::Relaxed);
                    barrier.wait();
                    let behind = slots.iter().filter(|s| s.load(Ordering::Relaxed) != step);
                    wrong.fetch_add(behind.count() as u64, Ordering::Relaxed);
                    barrier.wait();
                }
            });
            assert_eq!(wrong.load(Ordering::Relaxed), 0, "{threads} threads");
        }
    }
}
