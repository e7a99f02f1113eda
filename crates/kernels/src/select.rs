//! Which CPU kernels run: the one switch for every op of the crate.
//!
//! [`Kernels`] says how much of the crate's own CPU code runs: none ([`Kernels::Candle`],
//! candle's own ops throughout, the baseline), the convolution only
//! ([`Kernels::ConvOnly`], candle's composed ops for the rest), or every op with the
//! instructions of a [`KernelSet`] ([`Kernels::Fused`]): a portable path (im2col + GEMM
//! for the convolution, plain loops for the fused elementwise ops) and, where the CPU has
//! AVX2 + FMA or AVX-512F, direct 3×3 convolution kernels written for that instruction set.
//! By default every op runs with the best set the
//! CPU supports, detected at run time. Forcing a lower set runs what a smaller CPU runs, on
//! any machine: the tests run every op under each set the machine can execute, and
//! benchmarks compare them.
//!
//! The selection, in order of precedence:
//! 1. [`with_kernels`]: for ops built on the calling thread while a closure runs (each op
//!    records the selection when it is built, so its backward and its worker threads use
//!    the same one);
//! 2. [`set_kernels`]: for the whole process;
//! 3. the `TAU_KERNELS` environment variable (`auto`, `portable`, `avx2`, `avx512`,
//!    `conv-only` or `candle`), read once;
//! 4. every op with the best set the CPU supports ([`KernelSet::detected`]).
//!
//! Off the CPU, and for dtypes other than `f32`, candle's own ops run whatever the
//! selection (evaluation-mode BatchNorm composed of fewer of them unless `candle` is
//! selected). The `gemm` crate, which the portable convolution path and candle's matmul
//! call, picks its own micro-kernels from the CPU's features; this switch does not reach
//! inside it.
//!
//! ```
//! use tau_kernels::select::{KernelSet, Kernels, kernels, with_kernels};
//!
//! // Whatever the CPU, the portable path can be forced for the ops built in the closure.
//! let k = with_kernels(KernelSet::Portable, kernels);
//! assert_eq!(k, Kernels::Fused(KernelSet::Portable));
//! assert!(KernelSet::available().contains(&KernelSet::Portable));
//! assert_eq!("candle".parse::<Kernels>(), Ok(Kernels::Candle));
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
    /// x86-64 with AVX2 and FMA: direct 3×3, stride-1 convolution kernels in AVX2 and the
    /// probe's element-wise passes compiled for AVX2; the other convolutions and ops as
    /// [`KernelSet::Portable`].
    Avx2,
    /// x86-64 with AVX-512F: the direct 3×3, stride-1 convolution kernels in AVX-512.
    Avx512,
}

impl KernelSet {
    /// Every set, from the most portable up.
    pub const ALL: [KernelSet; 3] = [KernelSet::Portable, KernelSet::Avx2, KernelSet::Avx512];

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
            KernelSet::Avx2 => has_avx2_fma(),
            KernelSet::Avx512 => has_avx512f(),
        }
    }

    /// The set's name, as `TAU_KERNELS` and `tau-resnet bench` spell it.
    pub fn name(self) -> &'static str {
        match self {
            KernelSet::Portable => "portable",
            KernelSet::Avx2 => "avx2",
            KernelSet::Avx512 => "avx512",
        }
    }
}

impl fmt::Display for KernelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How much of the crate's own CPU code runs (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernels {
    /// candle's own ops throughout, the convolution included (the baseline benchmarks
    /// compare against).
    Candle,
    /// The crate's convolution (with the best kernel set of the CPU), candle's composed
    /// ops for the rest (BatchNorm, the elementwise chains, the blocks).
    ConvOnly,
    /// Every op of the crate, with the instructions of the set.
    Fused(KernelSet),
}

impl Kernels {
    /// Every op, with the best set of this CPU: the default.
    pub fn best() -> Kernels {
        Kernels::Fused(KernelSet::detected())
    }

    /// Whether the convolution is the crate's own.
    pub fn own_conv(self) -> bool {
        self != Kernels::Candle
    }

    /// Whether the fused ops (BatchNorm, elementwise chains, whole blocks) are the crate's.
    pub fn fused(self) -> bool {
        matches!(self, Kernels::Fused(_))
    }

    /// The instruction set the crate's own kernels use.
    pub fn set(self) -> KernelSet {
        match self {
            Kernels::Fused(set) => set,
            Kernels::Candle | Kernels::ConvOnly => KernelSet::detected(),
        }
    }
}

impl From<KernelSet> for Kernels {
    fn from(set: KernelSet) -> Self {
        Kernels::Fused(set)
    }
}

impl fmt::Display for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kernels::Candle => f.write_str("candle"),
            Kernels::ConvOnly => f.write_str("conv-only"),
            Kernels::Fused(set) => f.write_str(set.name()),
        }
    }
}

/// A kernel selection that is not a known name, or that this CPU cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelsError {
    /// The name is not a kernel selection.
    #[error("unknown kernels {0:?} (expected auto, portable, avx2, avx512, conv-only or candle)")]
    Unknown(String),
    /// The CPU lacks the set's instructions.
    #[error("this CPU cannot run the {0} kernels (it runs: {1})")]
    Unsupported(KernelSet, String),
}

impl FromStr for KernelSet {
    type Err = KernelsError;

    /// Parses a set's name (case-insensitive); `auto` is the detected set.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<Kernels>()? {
            Kernels::Fused(set) => Ok(set),
            _ => Err(KernelsError::Unknown(s.trim().to_ascii_lowercase())),
        }
    }
}

impl FromStr for Kernels {
    type Err = KernelsError;

    /// Parses a selection (case-insensitive): `auto` (every op, the detected set), a set's
    /// name, `conv-only` (also `unfused`) or `candle`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(Kernels::best()),
            "candle" => Ok(Kernels::Candle),
            "conv-only" | "unfused" => Ok(Kernels::ConvOnly),
            _ => KernelSet::ALL
                .into_iter()
                .find(|k| k.name() == s)
                .map(Kernels::Fused)
                .ok_or(KernelsError::Unknown(s)),
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
fn has_avx512f() -> bool {
    // A CPU with AVX-512F has AVX2 and FMA; checked all the same, as the set includes them.
    std::is_x86_feature_detected!("avx512f") && has_avx2_fma()
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2_fma() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512f() -> bool {
    false
}

/// The process-wide selection: 0 while unset (then the environment, else detection
/// decides), else [`encode`]d.
static PROCESS: AtomicU8 = AtomicU8::new(0);

thread_local! {
    static THREAD: Cell<Option<Kernels>> = const { Cell::new(None) };
}

fn encode(k: Kernels) -> u8 {
    match k {
        Kernels::Candle => 1,
        Kernels::ConvOnly => 2,
        Kernels::Fused(set) => 3 + set as u8,
    }
}

fn decode(v: u8) -> Option<Kernels> {
    match v {
        1 => Some(Kernels::Candle),
        2 => Some(Kernels::ConvOnly),
        _ => KernelSet::ALL
            .into_iter()
            .find(|&s| 3 + s as u8 == v)
            .map(Kernels::Fused),
    }
}

/// Checks that the CPU runs `k`'s kernel set.
fn check(k: Kernels) -> Result<Kernels, KernelsError> {
    if k.set().supported() {
        Ok(k)
    } else {
        let runs: Vec<&str> = KernelSet::available().iter().map(|k| k.name()).collect();
        Err(KernelsError::Unsupported(k.set(), runs.join(", ")))
    }
}

/// Selects the kernels for the whole process (below [`with_kernels`]).
///
/// # Errors
/// A kernel set this CPU cannot run.
pub fn set_kernels(k: impl Into<Kernels>) -> Result<(), KernelsError> {
    PROCESS.store(encode(check(k.into())?), Ordering::Relaxed);
    Ok(())
}

/// The selection `TAU_KERNELS` asks for, checked: `None` when the variable is unset or
/// empty.
///
/// # Errors
/// An unknown name, or a set this CPU cannot run; programs call this at start-up to turn a
/// bad value into one clear message (otherwise [`kernels`] ignores it with a warning).
pub fn kernels_from_env() -> Result<Option<Kernels>, KernelsError> {
    match std::env::var(KERNELS_ENV) {
        Ok(v) if !v.trim().is_empty() => check(v.parse()?).map(Some),
        _ => Ok(None),
    }
}

/// The kernels the ops built now on this thread use (see the module docs for the order of
/// precedence).
pub fn kernels() -> Kernels {
    if let Some(k) = THREAD.with(Cell::get) {
        return k;
    }
    if let Some(k) = decode(PROCESS.load(Ordering::Relaxed)) {
        return k;
    }
    static FROM_ENV: OnceLock<Kernels> = OnceLock::new();
    *FROM_ENV.get_or_init(|| match kernels_from_env() {
        Ok(k) => k.unwrap_or_else(Kernels::best),
        Err(e) => {
            tracing::warn!("{KERNELS_ENV}: {e}; using the {} kernels", Kernels::best());
            Kernels::best()
        }
    })
}

/// Runs `f` with `k` selected for the ops it builds on this thread (other threads are
/// unaffected), then restores the previous selection, also when `f` panics.
///
/// # Panics
/// When this CPU cannot run `k`'s kernel set (check [`KernelSet::supported`] first).
pub fn with_kernels<R>(k: impl Into<Kernels>, f: impl FnOnce() -> R) -> R {
    let k = match check(k.into()) {
        Ok(k) => k,
        Err(e) => panic!("with_kernels: {e}"),
    };
    struct Restore(Option<Kernels>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD.with(|t| t.set(self.0));
        }
    }
    let _restore = Restore(THREAD.with(|t| t.replace(Some(k))));
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
            Err(KernelsError::Unknown(_))
        ));
        assert!("candle".parse::<KernelSet>().is_err());
        for k in [Kernels::Candle, Kernels::ConvOnly, Kernels::best()] {
            assert_eq!(k.to_string().parse::<Kernels>(), Ok(k));
            assert_eq!(decode(encode(k)), Some(k));
        }
        assert_eq!("unfused".parse::<Kernels>(), Ok(Kernels::ConvOnly));
        assert!(!Kernels::Candle.own_conv() && !Kernels::Candle.fused());
        assert!(Kernels::ConvOnly.own_conv() && !Kernels::ConvOnly.fused());
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
            assert_eq!(check(k.into()).is_ok(), k.supported());
        }
    }

    #[test]
    fn thread_selection_nests_and_stays_on_its_thread() {
        let outer = kernels();
        with_kernels(KernelSet::Portable, || {
            assert_eq!(kernels(), Kernels::Fused(KernelSet::Portable));
            with_kernels(Kernels::Candle, || assert_eq!(kernels(), Kernels::Candle));
            assert_eq!(kernels(), Kernels::Fused(KernelSet::Portable));
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
