"""The DiT train-step bench on an accelerator, in bf16, per attention backend and shape.

Runs `vidsim bench dit` once per variant below, each in its own process (a variant that
fails or runs out of memory does not stop the rest) under a time limit, and writes
OUT/summary.json (every variant's bench JSON, or its error) and OUT/summary.md (the
table of docs/benchmarks.md "DiT on a GPU"). MFU is against two denominators: the
8192^3 bf16 matmul measured in the same process, and the chip's published dense bf16
peak where vidsim knows it (vidsim/train/metrics.py).

Run (from the repository root, on a machine whose jax sees the accelerator):
  python tools/bench_accelerator.py OUT [--only NAME ...] [--set KEY=VALUE ...]
(--set adds --config.KEY=VALUE to every variant, e.g. --set dit.depth=2 for a quick try.)
"""

import argparse
import json
import os
import subprocess
import sys
import time

BF16 = ["--config.dit.dtype=bfloat16", "--config.bench.warmup=2", "--config.bench.steps=10"]
BENCH = ["--config", "experiments/dit_bench.py", *BF16]
# The 1B pod model (experiments/pod_dit_1b_256p.py) on one chip: 8,192-token rows.
POD_1B = ["--config", "experiments/pod_dit_1b_256p.py", *BF16]

# (name, what it measures, arguments, time limit in seconds)
VARIANTS = [
    ("bench_cudnn", "dit_bench, 2 rows of 1,024, cuDNN attention",
     [*BENCH, "--config.dit.attention_impl=cudnn"], 90),
    ("bench_xla", "dit_bench, 2 rows of 1,024, XLA attention",
     [*BENCH, "--config.dit.attention_impl=xla"], 90),
    ("bench_cudnn_32rows", "dit_bench, 32 rows of 1,024, cuDNN attention",
     [*BENCH, "--config.dit.attention_impl=cudnn", "--config.train.rows_per_batch=32"], 90),
    ("bench_xla_32rows", "dit_bench, 32 rows of 1,024, XLA attention",
     [*BENCH, "--config.dit.attention_impl=xla", "--config.train.rows_per_batch=32"], 90),
    ("pod1b_cudnn", "pod_dit_1b_256p, 2 rows of 8,192, cuDNN attention, remat none",
     [*POD_1B, "--config.dit.attention_impl=cudnn", "--config.train.rows_per_batch=2"], 150),
    ("pod1b_xla", "pod_dit_1b_256p, 1 row of 8,192, XLA attention, remat full",
     [*POD_1B, "--config.dit.attention_impl=xla", "--config.train.rows_per_batch=1", "--config.dit.remat=full"], 110),
    ("pod1b_cudnn_full", "pod_dit_1b_256p, 1 row of 8,192, cuDNN attention, remat full",
     [*POD_1B, "--config.dit.attention_impl=cudnn", "--config.train.rows_per_batch=1", "--config.dit.remat=full"], 110),
    ("pod1b_cudnn_blocks",
     "pod_dit_1b_256p, 2 rows of 8,192 as blocks of 4,096 (dit.segment_blocks=2), cuDNN attention, remat none",
     [*POD_1B, "--config.dit.attention_impl=cudnn", "--config.train.rows_per_batch=2", "--config.dit.segment_blocks=2"], 150),
    ("pod1b_cudnn_1seg", "pod_dit_1b_256p, 2 rows of one 8,192-token segment, cuDNN attention, remat none",
     [*POD_1B, "--config.dit.attention_impl=cudnn", "--config.train.rows_per_batch=2", "--config.bench.segments_per_row=1"], 150),
]


def run_variant(name, arguments, limit, out):
  path = os.path.join(out, f"{name}.json")
  command = [sys.executable, "-m", "vidsim", "bench", "dit", *arguments, "--out", path]
  start = time.time()
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=limit, check=False)
    log, rc = done.stdout + done.stderr, done.returncode
  except subprocess.TimeoutExpired as e:
    log, rc = ((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")), "timeout"
  with open(os.path.join(out, "log.txt"), "a") as f:
    f.write(f"==== {name} (rc {rc}, {time.time() - start:.0f} s): {' '.join(command)}\n{log}\n")
  if rc == 0 and os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {"error": f"rc {rc}", "log_tail": log[-1500:]}


def table(rows):
  lines = ["| variant | step (s) | tokens/s | model TFLOP/step | TFLOP/s | MFU of matmul | MFU of peak | peak memory (GiB) |",
           "|---|--:|--:|--:|--:|--:|--:|--:|"]
  for name, what, result in rows:
    if "error" in result:
      lines.append(f"| {what} | {result['error']} | | | | | | |")
      continue
    memory = result.get("device_peak_bytes")
    lines.append(
        f"| {what} | {result['step_time_s']:.4f} | {result['tokens_per_s']:,.0f} | "
        f"{result['flops_per_step'] / 1e12:.2f} | {result['flops_per_s'] / 1e12:.0f} | {result['mfu']:.2f} | "
        f"{result.get('mfu_of_peak', float('nan')):.2f} | {'' if memory is None else f'{memory / 2**30:.1f}'} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out")
  parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
  parser.add_argument("--set", nargs="*", default=[], help="KEY=VALUE config overrides for every variant")
  args = parser.parse_args()
  names = [name for name, *_ in VARIANTS]
  unknown = sorted(set(args.only or ()) - set(names))
  if unknown:
    parser.error(f"--only {' '.join(unknown)}: no such variant; choose from {', '.join(names)}")  # Exits 2.
  os.makedirs(args.out, exist_ok=True)
  rows = []
  for name, what, arguments, limit in VARIANTS:
    if args.only and name not in args.only:
      continue
    result = run_variant(name, [*arguments, *(f"--config.{kv}" for kv in args.set)], limit, args.out)
    rows.append((name, what, result))
    short = {k: result.get(k) for k in ("step_time_s", "mfu", "mfu_of_peak", "error")}
    print(f"{name}: {short}", flush=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
      json.dump({name: result for name, _, result in rows}, f, indent=2, default=float)
  first = next((r for _, _, r in rows if "error" not in r), {})
  header = (f"{first.get('device_kind', '?')}, jax {first.get('jax', '?')}; {first.get('matmul_dtype', '?')} matmul "
            f"{first.get('matmul_flops_per_s', 0) / 1e12:.0f} TFLOP/s measured, peak "
            f"{(first.get('peak_flops_per_s') or 0) / 1e12:.0f} TFLOP/s published")
  text = header + "\n\n" + table(rows) + "\n"
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
