//! A team of threads that works through a chain of dependent steps together: each thread
//! takes its share of every step and the team meets at a spinning barrier between steps.
//!
//! The theory network's full-batch step is a chain of L small products (32 × 512 × 512):
//! handing each product to rayon (as the `gemm` crate does) wakes and parks the pool's
//! threads hundreds of times a step, and that waking took about a fifth of the step's time
//! on 2 cores. A team spins instead: a barrier between two steps costs a few hundred
//! nanoseconds while the threads are on their cores, and falls back to yielding when they
//! are not (a loaded machine), so it never holds a core another thread needs for long.

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

/// Runs `work(rank, barrier)` on `threads` threads at once (this one and `threads` − 1
/// scoped ones), rank 0..threads, and returns when all have. `work` must call
/// `barrier.wait()` equally often on every rank, and must not panic (a panicking rank
/// would leave the others waiting at the barrier).
pub(crate) fn run<F>(threads: usize, work: F)
where
    F: Fn(usize, &SpinBarrier) + Sync,
{
    let threads = threads.max(1);
    let barrier = SpinBarrier::new(threads);
    if threads == 1 {
        work(0, &barrier);
        return;
    }
    std::thread::scope(|s| {
        for rank in 1..threads {
            let (work, barrier) = (&work, &barrier);
            s.spawn(move || work(rank, barrier));
        }
        work(0, &barrier);
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

    #[test]
    fn the_barrier_orders_every_step() {
        // Each step, every rank adds to its own slot, then (after the barrier) checks that
        // every slot holds the step's count: a rank that ran ahead would see a slot behind.
        // (Counted, not asserted inside: a panicking rank would leave the others waiting.)
        for threads in [1, 2, 3, 4] {
            let slots: Vec<AtomicU64> = (0..threads).map(|_| AtomicU64::new(0)).collect();
            let wrong = AtomicU64::new(0);
            run(threads, |rank, barrier| {
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
