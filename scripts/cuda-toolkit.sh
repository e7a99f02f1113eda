#!/usr/bin/env bash
# cuda-toolkit.sh: a CUDA toolkit from NVIDIA's PyPI wheels, for building `--features cuda`
# on a machine with no system CUDA and no GPU (and so no driver).
#
#   scripts/cuda-toolkit.sh            install the toolkit into .cuda-toolkit/ and write its env file
#   scripts/cuda-toolkit.sh --build    the same, then build tau-resnet with --features cudnn
#   source .cuda-toolkit/env.sh        the environment for any later cargo command
#
# What it does, each step skipped when already done (re-running is cheap):
#   1. `pip install --target .cuda-toolkit/wheels` of the pinned wheels, in one call (nvcc and
#      nvvm must come at the same version);
#   2. unversioned symlinks (libcudart.so -> libcudart.so.13, ...) so the linker finds them;
#   3. a link-only libcuda.so: the driver library comes with the driver, not in any wheel, so a
#      stub is generated from the declarations in cuda.h, every function returning
#      CUDA_ERROR_STUB_LIBRARY (34). Its soname is libcuda.so.1, so a binary linked against it
#      loads the real driver on a GPU machine;
#   4. .cuda-toolkit/env.sh: CUDA_ROOT, PATH, CUDA_COMPUTE_CAP (default 90, the H100/H200;
#      candle-kernels otherwise asks nvidia-smi), LIBRARY_PATH, LD_LIBRARY_PATH, CARGO_TARGET_DIR;
#   5. with --build: `cargo build --release -p tau-resnet --features FEATURE` into
#      target-cuda/ so the CPU build in target/ is not evicted. About 18 minutes on 2 idle cores
#      the first time.
#
# Options: --dir DIR (default .cuda-toolkit), --target-dir DIR (default target-cuda),
#          --build, --features cuda|cudnn (default cudnn: cuDNN convolutions and BatchNorm;
#          `cuda` builds without cuDNN, on candle's own CUDA kernels), -h/--help.
#          Environment: PYTHON (default python3), CUDA_COMPUTE_CAP.
set -euo pipefail

# The pins: the CUDA 13.0 toolkit (the PTX that nvcc 13.0 writes loads on any 13.x driver;
# a newer nvcc's would not load on a 13.0 driver).
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-runtime==13.0.96
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
  nvidia-cuda-nvrtc==13.0.88
  # cuDNN 9 for CUDA 13 (the `cudnn` feature; a 517 MB wheel). Linked as libcudnn.so.9, so
  # any cuDNN 9 a GPU machine has (PyTorch's, say) serves at run time.
  nvidia-cudnn-cu13==9.28.1.4
)

die() { echo "cuda-toolkit: error: $*" >&2; exit 1; }
say() { echo "cuda-toolkit: $*" >&2; }

usage() { sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; }

root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$root/.cuda-toolkit"
target_dir="$root/target-cuda"
build=0
feature=cudnn
while [[ $# -gt 0 ]]; do
  case "$1" in
    --build) build=1 ;;
    --features) [[ $# -ge 2 ]] || die "--features needs cuda or cudnn"; feature="$2"; shift ;;
    --features=*) feature="${1#--features=}" ;;
    --dir) [[ $# -ge 2 ]] || die "--dir needs a folder"; dir="$2"; shift ;;
    --dir=*) dir="${1#--dir=}" ;;
    --target-dir) [[ $# -ge 2 ]] || die "--target-dir needs a folder"; target_dir="$2"; shift ;;
    --target-dir=*) target_dir="${1#--target-dir=}" ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
case "$feature" in cuda | cudnn) ;; *) die "--features must be cuda or cudnn, not '$feature'" ;; esac
mkdir -p "$dir" || die "cannot create $dir"
dir="$(cd "$dir" && pwd)"
case "$target_dir" in /*) ;; *) target_dir="$PWD/$target_dir" ;; esac

python="${PYTHON:-python3}"
command -v "$python" > /dev/null || die "$python not found (set PYTHON to a Python with pip)"
"$python" -m pip --version > /dev/null 2>&1 || die "$python has no pip ($python -m pip failed)"
command -v gcc > /dev/null || die "gcc not found (needed to compile the libcuda.so stub)"

# pip_install FOLDER WHEEL...: one `pip install --target`, skipped when FOLDER holds exactly
# these pins already (a changed pin list installs afresh: pip --target does not upgrade
# in place).
pip_install() {
  local folder="$1"
  shift
  local want
  want="$(printf '%s\n' "$@")"
  if [[ -f "$folder/.pins" && "$(cat "$folder/.pins")" == "$want" ]]; then
    say "wheels in $folder already installed ($# pins), skipping"
    return
  fi
  rm -rf "$folder"
  say "installing $# wheels into $folder"
  "$python" -m pip install --quiet --no-deps --no-warn-script-location --target "$folder" "$@" \
    || die "pip install into $folder failed (is PyPI reachable?)"
  printf '%s\n' "$want" > "$folder/.pins"
}

# 1. the toolkit
pip_install "$dir/wheels" "${WHEELS[@]}"
cuda_root="$dir/wheels/nvidia/cu13"
[[ -x "$cuda_root/bin/nvcc" ]] || die "no nvcc at $cuda_root/bin/nvcc after the install"
[[ -f "$cuda_root/include/cuda.h" ]] || die "no cuda.h at $cuda_root/include after the install"
lib="$cuda_root/lib"
[[ -d "$lib" ]] || die "no library folder $lib after the install"

# 2. unversioned names for every versioned library (libfoo.so.13 -> libfoo.so)
link_unversioned() {
  local folder="$1" f base
  for f in "$folder"/lib*.so.*; do
    [[ -e "$f" ]] || continue
    base="${f##*/}"
    base="${base%%.so.*}.so"
    [[ -e "$folder/$base" ]] || ln -s "${f##*/}" "$folder/$base"
  done
}
cudnn_lib="$dir/wheels/nvidia/cudnn/lib"
link_unversioned "$lib"
link_unversioned "$cudnn_lib"
for l in cudart cublas cublasLt curand nvrtc; do
  [[ -e "$lib/lib$l.so" ]] || die "no lib$l.so.* in $lib (the wheel set changed?)"
done
[[ -e "$cudnn_lib/libcudnn.so" ]] || die "no libcudnn.so.* in $cudnn_lib (the wheel set changed?)"


# 3. the libcuda.so stub, regenerated when cuda.h changes
stub="$dir/stub"
stub_so="$stub/libcuda.so"
if [[ -f "$stub_so" && "$stub_so" -nt "$cuda_root/include/cuda.h" ]]; then
  say "libcuda.so stub up to date, skipping"
else
  mkdir -p "$stub"
  say "generating the libcuda.so stub from $cuda_root/include/cuda.h"
  # Every `CUresult CUDAAPI cuXxx(` in the header (the legacy names too), and every name the
  # header's macros turn them into (cuMemAlloc -> cuMemAlloc_v2, the _ptsz/_ptds variants of
  # the per-thread default stream), read from the preprocessed header both ways.
  {
    tr '\n' ' ' < "$cuda_root/include/cuda.h" | grep -oE 'CUresult +CUDAAPI +cu[A-Za-z0-9_]+ *\(' || true
    for ptds in "" "-DCUDA_API_PER_THREAD_DEFAULT_STREAM"; do
      gcc -E -P $ptds -I "$cuda_root/include" -x c "$cuda_root/include/cuda.h" \
        | tr '\n' ' ' | grep -oE 'CUresult +cu[A-Za-z0-9_]+ *\(' || true
    done
  } | grep -oE 'cu[A-Za-z0-9_]+ *\($' | tr -d ' (' | sort -u > "$stub/symbols.txt"
  n="$(wc -l < "$stub/symbols.txt")"
  [[ $n -gt 300 ]] || die "found only $n cu* declarations in cuda.h (parser out of date?)"
  {
    echo "/* Generated by scripts/cuda-toolkit.sh from cuda.h: a link-only libcuda.so. */"
    echo "/* Every driver function returns CUDA_ERROR_STUB_LIBRARY (34). */"
    while read -r s; do echo "int $s(void) { return 34; }"; done < "$stub/symbols.txt"
  } > "$stub/libcuda-stub.c"
  gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$stub_so.tmp" "$stub/libcuda-stub.c" \
    || die "compiling the libcuda.so stub failed"
  mv "$stub_so.tmp" "$stub_so"
  ln -sf libcuda.so "$stub/libcuda.so.1"
  say "stub: $n functions"
fi

# 4. the env file
env_file="$dir/env.sh"
lib_path="$lib:$cudnn_lib"
cat > "$env_file.tmp" << EOF
# Generated by scripts/cuda-toolkit.sh: \`source\` it before building or running with CUDA.
export CUDA_ROOT="$cuda_root"
export CUDA_PATH="$cuda_root"
export CUDA_HOME="$cuda_root"
export PATH="$cuda_root/bin:\${PATH}"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export LIBRARY_PATH="$lib_path:$stub\${LIBRARY_PATH:+:\${LIBRARY_PATH}}"
export CPATH="$cuda_root/include\${CPATH:+:\${CPATH}}"
export CARGO_TARGET_DIR="\${CARGO_TARGET_DIR:-$target_dir}"
# At run time: the wheels' libraries; the stub only where no driver is installed (a binary
# run here then finds no CUDA device, with CUDA_ERROR_STUB_LIBRARY, and uses the CPU).
if ldconfig -p 2> /dev/null | grep -q 'libcuda\.so\.1 '; then
  export LD_LIBRARY_PATH="$lib_path\${LD_LIBRARY_PATH:+:\${LD_LIBRARY_PATH}}"
else
  export LD_LIBRARY_PATH="$lib_path:$stub\${LD_LIBRARY_PATH:+:\${LD_LIBRARY_PATH}}"
fi
EOF
mv "$env_file.tmp" "$env_file"
say "environment: source $env_file"
# shellcheck source=/dev/null
source "$env_file"
nvcc --version | tail -2 >&2 || die "nvcc does not run (see above)"

# 5. the build
if [[ $build == 1 ]]; then
  command -v cargo > /dev/null || die "cargo not found"
  say "building tau-resnet with --features $feature into $CARGO_TARGET_DIR (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP)"
  (cd "$root" && cargo build --release -p tau-resnet --features "$feature") \
    || die "cargo build --features $feature failed"
  bin="$CARGO_TARGET_DIR/release/tau-resnet"
  [[ -x "$bin" ]] || die "no binary at $bin after the build"
  say "built $bin ($(du -h "$bin" | cut -f1))"
fi
