#!/usr/bin/env bash
# gpu-check.sh: the one prepared GPU check of tau-resnet, in two halves.
#
#   scripts/gpu-check.sh prepare        here (no GPU needed): build the CUDA binary and the GPU
#                                       tests with scripts/cuda-toolkit.sh's toolkit, and pack
#                                       them (xz) into gpu-check/ (ignored) to carry
#   scripts/gpu-check.sh run [--out D]  on the GPU machine (no Rust toolchain, no network):
#                                       unpack, then in one go, each step under its own time
#                                       limit (at most 9 minutes in all, so that one
#                                       10-minute command holds it):
#     1. the device: nvidia-smi, the CUDA libraries found, PyTorch's version;
#     2. the GPU tests (crates/model/tests/cuda.rs): CPU against CUDA for every model family;
#     3. `tau-resnet bench --device cuda`: training steps of CIFAR ResNet-20/56/110 with and
#        without BN (batch 128) and ResNet-50 with BN (batch 64, 224x224);
#        and ResNet-20 ± BN once more on candle's own CUDA kernels (--conv candle);
#     4. scripts/bench-gpu-torch.py: the same steps in PyTorch + cuDNN on the same GPU;
#     5. a short real training run, CIFAR-10 (JPEG) ResNet-20 BN for 2 epochs from the
#        shared data (cifar10-jpeg.tar.gz), on CUDA and on the CPU, the test accuracies side
#        by side;
#   and writes summary.md and summary.json (plus every log) under D (default $OUT, else
#   gpu-check/out).
#
# Environment for `prepare`: GPU_CHECK_FEATURES (cudnn, the default: cuDNN convolutions and
# BatchNorm; or cuda: candle's own CUDA kernels only).
# Environment for `run`: GPU_CHECK_DATA (the folder holding cifar10-jpeg.tar.gz; default
# ../shared/data or shared/data), GPU_CHECK_QUICK=1 (fewer steps, for a dry run).
set -euo pipefail

die() { echo "gpu-check: error: $*" >&2; exit 1; }
say() { echo "gpu-check: $*" >&2; }

root="$(cd "$(dirname "$0")/.." && pwd)"
pack="$root/gpu-check"
cmd="${1:-}"
[[ $# -gt 0 ]] && shift

prepare() {
  command -v xz > /dev/null || die "xz not found"
  "$root/scripts/cuda-toolkit.sh"
  # shellcheck source=/dev/null
  source "$root/.cuda-toolkit/env.sh"
  cd "$root"
  local features="${GPU_CHECK_FEATURES:-cudnn}"
  case "$features" in cuda | cudnn) ;; *) die "GPU_CHECK_FEATURES must be cuda or cudnn" ;; esac
  say "building tau-resnet and the GPU tests with --features $features into $CARGO_TARGET_DIR"
  cargo build --release -p tau-resnet --features "$features" || die "building tau-resnet failed"
  local tests
  tests="$(cargo test --release -p tau-model --features "$features" --test cuda --no-run \
    --message-format=json 2> /dev/null \
    | grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4)"
  [[ -x "$tests" ]] || die "building the GPU tests failed (cargo test --release -p tau-model --features $features --test cuda --no-run)"
  mkdir -p "$pack"
  local bin="$CARGO_TARGET_DIR/release/tau-resnet"
  for pair in "$bin:tau-resnet" "$tests:cuda-tests"; do
    local src="${pair%%:*}" name="${pair##*:}"
    strip -o "$pack/$name" "$src"
    xz -T0 -6 -f "$pack/$name"
  done
  du -h "$pack"/*.xz >&2
  local total
  total="$(du -cm "$pack"/*.xz | tail -1 | cut -f1)"
  [[ $total -lt 60 ]] || die "the packed binaries take ${total} MiB: too much to carry (64 MiB in all)"
  say "carry: gpu-check (then: scripts/gpu-check.sh run)"
}

# Runs "$@" under `timeout LIMIT`, output to LOG; returns the command's status.
step() {
  local name="$1" limit="$2"
  shift 2
  say "$name (at most ${limit}s)"
  local t0=$SECONDS rc=0
  timeout "$limit" "$@" > "$out/$name.log" 2>&1 || rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" >> "$out/steps.txt"
  return $rc
}

run() {
  out="${OUT:-$pack/out}"
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --out) [[ $# -ge 2 ]] || die "--out needs a folder"; out="$2"; shift ;;
      *) die "unknown argument '$1'" ;;
    esac
    shift
  done
  mkdir -p "$out"
  : > "$out/steps.txt"
  local work
  work="$(mktemp -d)"
  for name in tau-resnet cuda-tests; do
    [[ -f "$pack/$name.xz" ]] || die "no $pack/$name.xz: run 'scripts/gpu-check.sh prepare' first and carry gpu-check/"
    xz -dc "$pack/$name.xz" > "$work/$name"
    chmod +x "$work/$name"
  done
  local quick="${GPU_CHECK_QUICK:-0}"

  # 1. The device and the libraries: PyTorch's CUDA wheels, and the driver's folder.
  local py_libs=""
  py_libs="$(python3 -c 'import nvidia, os, glob; r = nvidia.__path__[0]; print(":".join(sorted(set(glob.glob(os.path.join(r, "*", "lib"))))))' 2> /dev/null || true)"
  # The system toolkit's libraries too (nvcc's own folder first): PyTorch's wheels do not
  # always bring every library the binary links (libcurand is not among PyTorch 2.15's).
  local sys_libs="" d nvcc_dir=""
  command -v nvcc > /dev/null && nvcc_dir="$(dirname "$(command -v nvcc)")/.."
  for d in ${nvcc_dir:+"$nvcc_dir/lib64" "$nvcc_dir/targets/x86_64-linux/lib"} \
    /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [[ -d $d ]] && sys_libs="${sys_libs:+$sys_libs:}$d"
  done
  export LD_LIBRARY_PATH="${py_libs}${sys_libs:+:$sys_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  local missing
  missing="$(ldd "$work/tau-resnet" 2>&1 | grep 'not found' | awk '{print $1}' | tr '\n' ' ' || true)"
  {
    echo "date: $(date -u +%FT%TZ)"
    nvidia-smi -L 2>&1 || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
    nvcc --version 2>&1 | tail -1 || true
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())' 2>&1 || true
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    echo "--- ldd tau-resnet"
    ldd "$work/tau-resnet" 2>&1 | grep -E 'cuda|cublas|curand|nvrtc|cudnn|not found' || true
    [[ -z $missing ]] || echo "MISSING LIBRARIES (nothing of tau-resnet can run): $missing"
  } > "$out/device.txt"
  [[ -z $missing ]] || say "the binaries cannot load: $missing not found (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)"
  cat "$out/device.txt" >&2

  # 2. The GPU tests, one at a time (their CPU halves use every core).
  step gpu-tests 150 "$work/cuda-tests" --nocapture --test-threads=1 || true

  # 3. and 4. The training-step benchmarks, the same points in both.
  local steps=10 warmup=3
  [[ $quick == 1 ]] && steps=2 warmup=1
  step bench-tau-cifar 75 "$work/tau-resnet" bench --device cuda --json \
    --depths 20,56,110 --norms none,bn --batch 128 --theory-depth 0 \
    --steps "$steps" --warmup "$warmup" || true
  step bench-tau-resnet50 45 "$work/tau-resnet" bench --device cuda --json --skip-resnets \
    --bottleneck-depths 50 --norms bn --bottleneck-batch 64 --theory-depth 0 \
    --steps "$steps" --warmup "$warmup" || true
  # The same ResNet-20 steps on candle's own CUDA kernels (--conv candle: candle's
  # convolutions and candle-nn's BatchNorm): what the cuDNN ops gain.
  # candle's convolution backward is a direct loop: few steps, so it fits its time limit.
  step bench-tau-candle 45 "$work/tau-resnet" bench --device cuda --json --conv candle \
    --depths 20 --norms none,bn --batch 128 --theory-depth 0 \
    --steps 3 --warmup 1 || true
  step bench-torch 75 python3 "$root/scripts/bench-gpu-torch.py" --json \
    --depths 20,56,110 --norms none,bn --batch 128 \
    --bottleneck-depths 50 --bottleneck-norms bn --bottleneck-batch 64 \
    --steps "$steps" --warmup "$warmup" || true

  # 5. A short real training run on CUDA and on the CPU.
  local data="${GPU_CHECK_DATA:-}"
  if [[ -z $data ]]; then
    for d in "$root/../shared/data" "$root/shared/data"; do
      [[ -f "$d/cifar10-jpeg.tar.gz" ]] && data="$d" && break
    done
  fi
  if [[ -n $data && -f "$data/cifar10-jpeg.tar.gz" ]]; then
    mkdir -p "$work/data"
    tar xzf "$data/cifar10-jpeg.tar.gz" -C "$work/data"
    local dir
    dir="$(dirname "$(find "$work/data" -type d -name train | head -1)")"
    local epochs=2
    [[ $quick == 1 ]] && epochs=1
    for dev in cuda cpu; do
      local limit=60
      [[ $dev == cpu ]] && limit=90
      step "train-$dev" "$limit" "$work/tau-resnet" train \
        --config "$root/configs/cifar10-jpeg-resnet20-bn.toml" \
        --set "data.dir=\"$dir\"" --set "epochs=$epochs" --device "$dev" \
        --out "$out/train-$dev" || true
    done
  else
    say "no cifar10-jpeg.tar.gz found (set GPU_CHECK_DATA): training run skipped"
    echo "train skipped: no data" >> "$out/steps.txt"
  fi

  # The summary.
  python3 - "$out" << 'EOF' || say "writing the summary failed"
import glob, json, os, re, sys

out = sys.argv[1]


def records(name):
    path = os.path.join(out, name + ".log")
    recs = []
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line.startswith("{"):
                try:
                    recs.append(json.loads(line))
                except ValueError:
                    pass
    return recs


ours = records("bench-tau-cifar") + records("bench-tau-resnet50")
torch = {(r["model"], r["depth"], r["norm"], r["batch"]): r for r in records("bench-torch")}
candle = {(r["model"], r["depth"], r["norm"], r["batch"]): r for r in records("bench-tau-candle")}
rows = []
for r in ours:
    t = torch.get((r["model"], r["depth"], r["norm"], r["batch"]))
    c = candle.get((r["model"], r["depth"], r["norm"], r["batch"]))
    rows.append({
        "candle_kernels_images_per_s": c["images_per_s"] if c else None,
        "model": r["model"], "depth": r["depth"], "norm": r["norm"], "batch": r["batch"],
        "tau_images_per_s": r["images_per_s"],
        "torch_images_per_s": t["images_per_s"] if t else None,
        "ratio": r["images_per_s"] / t["images_per_s"] if t else None,
    })
tests = open(os.path.join(out, "gpu-tests.log")).read() if os.path.exists(os.path.join(out, "gpu-tests.log")) else ""
m = re.findall(r"test result: .*", tests)
skipped = tests.count("skipped: no CUDA device")
train = {}
for dev in ("cuda", "cpu"):
    for path in glob.glob(os.path.join(out, "train-" + dev, "**", "summary.json"), recursive=True):
        s = json.load(open(path))
        fm = s.get("final_metrics") or {}
        train[dev] = {"status": s.get("status"), "steps": s.get("steps"),
                      "test_acc": fm.get("test_acc"), "train_loss": fm.get("train_loss")}
summary = {
    "device": open(os.path.join(out, "device.txt")).read(),
    "steps": open(os.path.join(out, "steps.txt")).read(),
    "gpu_tests": (m[-1] if m else "no result line (see gpu-tests.log)")
    + (f" ({skipped} of them SKIPPED: no CUDA device)" if skipped else ""),
    "bench": rows,
    "train": train,
}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
md = ["# GPU check", "", "```", summary["device"].strip(), "```", "",
      "GPU tests: " + summary["gpu_tests"], "",
      "| model | depth | norm | batch | tau-resnet images/s | PyTorch + cuDNN images/s | ratio | candle's kernels images/s |",
      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
for r in rows:
    f = lambda v, p: "—" if v is None else f"{v:.{p}f}"
    md.append(f"| {r['model']} | {r['depth']} | {r['norm']} | {r['batch']} | "
              f"{f(r['tau_images_per_s'], 1)} | {f(r['torch_images_per_s'], 1)} | {f(r['ratio'], 2)} | "
              f"{f(r['candle_kernels_images_per_s'], 1)} |")
md += ["", "| training run | status | steps | test accuracy |", "| --- | --- | --- | --- |"]
for dev, t in train.items():
    md.append(f"| CIFAR-10 (JPEG) ResNet-20 BN, {dev} | {t['status']} | {t['steps']} | {t['test_acc']} |")
md += ["", "Steps (exit status, seconds):", "", "```", summary["steps"].strip(), "```"]
open(os.path.join(out, "summary.md"), "w").write("\n".join(md) + "\n")
print("\n".join(md))
EOF
  rm -rf "$work"
}

case "$cmd" in
  prepare) prepare "$@" ;;
  run) run "$@" ;;
  -h | --help | "") sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) die "unknown command '$cmd' (prepare or run)" ;;
esac
