//! With the `cuda` feature, compiles `src/cuda/elementwise.cu` to PTX with nvcc (found as
//! `$NVCC`, `$CUDA_ROOT/bin/nvcc` or on the `PATH`, as candle-kernels finds it). Without
//! it, does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/cuda/elementwise.cu");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("elementwise.ptx");
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("CUDA_ROOT")
                .map(|root| PathBuf::from(root).join("bin").join("nvcc"))
                .filter(|p| p.exists())
        })
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    // compute_75: the oldest architecture CUDA 13 supports, as PTX, so that the driver
    // JIT-compiles the kernels for whatever GPU runs them.
    let status = Command::new(&nvcc)
        .args(["-ptx", "-O3", "-arch=compute_75", "-o"])
        .arg(&out)
        .arg("src/cuda/elementwise.cu")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "{} failed ({s}) compiling src/cuda/elementwise.cu",
            nvcc.display()
        ),
        Err(e) => panic!(
            "cannot run {} ({e}): the `cuda` feature needs the CUDA toolkit's nvcc \
             (set NVCC or CUDA_ROOT, or see scripts/cuda-toolkit.sh)",
            nvcc.display()
        ),
    }
}
