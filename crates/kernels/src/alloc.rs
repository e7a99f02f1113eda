//! Allocator tuning for CPU training: keep freed memory in the process.
//!
//! A training step allocates and frees tensors of megabytes each (activations, gradients,
//! convolution scratch). glibc's defaults serve them with `mmap` or trim the heap after
//! each free, so every step page-faults the same memory back in and the kernel zeroes it:
//! about 16% of a CIFAR ResNet-20 step on the CPU. [`tune_allocator`] raises the mmap
//! threshold to its maximum (32 MiB) and turns trimming off, so freed blocks are reused.
//! The `tau-resnet` binary calls it at start-up; a program that trains with this crate on
//! the CPU can call it first thing in `main`.

/// Applies the tuning described in the module docs, unless the user configured glibc's
/// allocator (any `MALLOC_*` environment variable, or `GLIBC_TUNABLES`). Returns whether
/// it was applied; on other platforms and C libraries it does nothing and returns false.
///
/// Best called before other threads start allocating (glibc's `mallopt` is thread-safe,
/// but blocks allocated before the call keep the old policy).
pub fn tune_allocator() -> bool {
    let user_set = std::env::vars_os().any(|(k, _)| {
        let k = k.to_string_lossy();
        k.starts_with("MALLOC_") || k == "GLIBC_TUNABLES"
    });
    !user_set && apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> bool {
    use std::ffi::c_int;
    unsafe extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }
    const M_TRIM_THRESHOLD: c_int = -1;
    const M_TOP_PAD: c_int = -2;
    const M_MMAP_THRESHOLD: c_int = -3;
    // SAFETY: mallopt only changes allocator parameters and is MT-safe in glibc. A
    // rejected value leaves the default in place (return value 0).
    unsafe {
        let a = mallopt(M_MMAP_THRESHOLD, 32 << 20);
        let b = mallopt(M_TRIM_THRESHOLD, c_int::MAX);
        let c = mallopt(M_TOP_PAD, 64 << 20);
        a == 1 && b == 1 && c == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}
