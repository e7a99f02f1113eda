//! Which instruction-set-specific CPU kernels run: the one switch for every op of the crate.
//!
//! The CPU ops have a portable path (im2col + GEMM for the convolution, plain loops for the
//! fused elementwise ops) and, where the CPU has AVX-512F, direct 3×3 convolution kernels.
//! By default the best set the CPU supports runs, detected at run time. Forcing a lower set
//! runs what a smaller CPU runs, on any machine: the tests run every op under each set the
//! machine can execute, and benchmarks compare them.
//!
//! The selection, in order of precedence:
//! 1. [`with_kernels`]: for ops built on the calling thread while a closure runs (each op
//!    records the set when it is built, so its backward and its worker threads use the
//!    same one);
//! 2. [`set_kernels`]: for the whole process;
//! 3. the `TAU_KERNELS` environment variable (`portable`, `avx512` or `auto`), read once;
//! 4. the best set the CPU supports ([`KernelSet::detected`]).
//!
//! The `gemm` crate, which the portable convolution path and candle's matmul call, picks
//! its own micro-kernels from the CPU's features; this switch does not reach inside it.
//!
//! ```
//! use tau_model::kernel_set::{KernelSet, kernels, with_kernels};
//!
//! // Whatever the CPU, the portable path can be forced for the ops built in the closure.
//! let set = with_kernels(KernelSet::Portable, kernels);
//! assert_eq!(set, KernelSet::Portable);
//! assert!(KernelSet::available().contains(&KernelSet::Portable));
//! ```

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

/// The environment variable that selects the kernel set for a process (see the module docs).
pub const KERNELS_ENV: &str = "TAU_KERNELS";

/// A set of CPU kernels, from the most portable up; a CPU that runs one runs every set
/// before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KernelSet {
    /// Any CPU: im2col + GEMM convolutions and plain loops.
    Portable,
    /// x86-64 with AVX-512F: direct 3×3, stride-1 convolution kernels besides the rest.
    Avx512,
}

impl KernelSet {
    /// Every set, from the most portable up.
    pub const ALL: [KernelSet; 2] = [KernelSet::Portable, KernelSet::Avx512];

    /// The best set this CPU runs, detected at run time.
    pub fn detected() -> KernelSet {
        static DETECTED: OnceLock<KernelSet> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            Self::ALL
                .into_iter()
                .rev()
                .find(|k| k.supported())
                .unwrap_or(KernelSet::Portable)
        })
    }

    /// The sets this CPU runs, from the most portable up: what the tests run each op under.
    pub fn available() -> Vec<KernelSet> {
        Self::ALL.into_iter().filter(|k| k.supported()).collect()
    }

    /// Whether this CPU has the instructions of the set.
    pub fn supported(self) -> bool {
        match self {
            KernelSet::Portable => true,
            KernelSet::Avx512 => has_avx512f(),
        }
    }

    /// The set's name, as `TAU_KERNELS` and `tau-resnet bench` spell it.
    pub fn name(self) -> &'static str {
        match self {
            KernelSet::Portable => "portable",
            KernelSet::Avx512 => "avx512",
        }
    }

    fn index(self) -> u8 {
        self as u8 + 1
    }

    fn from_index(i: u8) -> Option<KernelSet> {
        Self::ALL.into_iter().find(|k| k.index() == i)
    }
}

impl fmt::Display for KernelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A kernel-set name that is not one of [`KernelSet::ALL`] (nor `auto`), or a set this CPU
/// cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelSetError {
    /// The name is not a kernel set.
    #[error("unknown kernel set {0:?} (expected auto, portable or avx512)")]
    Unknown(String),
    /// The CPU lacks the set's instructions.
    #[error("this CPU cannot run the {0} kernels (it runs: {1})")]
    Unsupported(KernelSet, String),
}

impl FromStr for KernelSet {
    type Err = KernelSetError;

    /// Parses a set's name (case-insensitive); `auto` is the detected set.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        if s == "auto" {
            return Ok(KernelSet::detected());
        }
        KernelSet::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or(KernelSetError::Unknown(s))
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx512f() -> bool {
    std::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512f() -> bool {
    false
}

/// The process-wide set: 0 while unset (then the environment, else detection decides).
static PROCESS: AtomicU8 = AtomicU8::new(0);

thread_local! {
    static THREAD: Cell<Option<KernelSet>> = const { Cell::new(None) };
}

/// Checks that the CPU runs `set`.
fn check(set: KernelSet) -> Result<KernelSet, KernelSetError> {
    if set.supported() {
        Ok(set)
    } else {
        let runs: Vec<&str> = KernelSet::available().iter().map(|k| k.name()).collect();
        Err(KernelSetError::Unsupported(set, runs.join(", ")))
    }
}

/// Selects the kernel set for the whole process (below [`with_kernels`]).
///
/// # Errors
/// A set this CPU cannot run.
pub fn set_kernels(set: KernelSet) -> Result<(), KernelSetError> {
    PROCESS.store(check(set)?.index(), Ordering::Relaxed);
    Ok(())
}

/// The set `TAU_KERNELS` asks for, checked: `None` when the variable is unset or empty.
///
/// # Errors
/// An unknown name, or a set this CPU cannot run; programs call this at start-up to turn a
/// bad value into one clear message (otherwise [`kernels`] ignores it with a warning).
pub fn kernels_from_env() -> Result<Option<KernelSet>, KernelSetError> {
    match std::env::var(KERNELS_ENV) {
        Ok(v) if !v.trim().is_empty() => check(v.parse()?).map(Some),
        _ => Ok(None),
    }
}

/// The kernel set the ops built now on this thread use (see the module docs for the
/// order of precedence).
pub fn kernels() -> KernelSet {
    if let Some(set) = THREAD.with(Cell::get) {
        return set;
    }
    if let Some(set) = KernelSet::from_index(PROCESS.load(Ordering::Relaxed)) {
        return set;
    }
    static FROM_ENV: OnceLock<KernelSet> = OnceLock::new();
    *FROM_ENV.get_or_init(|| match kernels_from_env() {
        Ok(set) => set.unwrap_or_else(KernelSet::detected),
        Err(e) => {
            tracing::warn!(
                "{KERNELS_ENV}: {e}; using the {} kernels",
                KernelSet::detected()
            );
            KernelSet::detected()
        }
    })
}

/// Runs `f` with `set` selected for the ops it builds on this thread (other threads are
/// unaffected), then restores the previous selection, also when `f` panics.
///
/// # Panics
/// When this CPU cannot run `set` (check [`KernelSet::supported`] first).
pub fn with_kernels<R>(set: KernelSet, f: impl FnOnce() -> R) -> R {
    if let Err(e) = check(set) {
        panic!("with_kernels: {e}");
    }
    struct Restore(Option<KernelSet>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD.with(|t| t.set(self.0));
        }
    }
    let _restore = Restore(THREAD.with(|t| t.replace(Some(set))));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_errors() {
        for k in KernelSet::ALL {
            assert_eq!(k.name().parse::<KernelSet>(), Ok(k));
            assert_eq!(k.name().to_uppercase().parse::<KernelSet>(), Ok(k));
        }
        assert_eq!("auto".parse::<KernelSet>(), Ok(KernelSet::detected()));
        assert!(matches!(
            "avx9".parse::<KernelSet>(),
            Err(KernelSetError::Unknown(_))
        ));
    }

    #[test]
    fn available_sets_end_at_the_detected_one() {
        let avail = KernelSet::available();
        assert_eq!(avail.first(), Some(&KernelSet::Portable));
        assert_eq!(avail.last(), Some(&KernelSet::detected()));
        assert!(avail.windows(2).all(|w| w[0] < w[1]));
        for k in KernelSet::ALL {
            assert_eq!(avail.contains(&k), k.supported());
            // What set_kernels and kernels_from_env check (not called here: the process
            // selection is shared with the tests running beside this one).
            assert_eq!(check(k).is_ok(), k.supported());
        }
    }

    #[test]
    fn thread_selection_nests_and_stays_on_its_thread() {
        let outer = kernels();
        with_kernels(KernelSet::Portable, || {
            assert_eq!(kernels(), KernelSet::Portable);
            let best = KernelSet::detected();
            with_kernels(best, || assert_eq!(kernels(), best));
            assert_eq!(kernels(), KernelSet::Portable);
            // Another thread sees the process selection, not this thread's.
            std::thread::spawn(move || assert_eq!(kernels(), outer))
                .join()
                .unwrap();
        });
        assert_eq!(kernels(), outer);
        // Restored after a panic too.
        let r = std::panic::catch_unwind(|| with_kernels(KernelSet::Portable, || panic!("boom")));
        assert!(r.is_err());
        assert_eq!(kernels(), outer);
    }
}
