"""DiT speed benchmark: a block stack large enough to be matmul-bound on a CPU.

Command:
  vidsim bench dit --config experiments/dit_bench.py --out /tmp/dit_bench.json
  (one row per step: --config.train.rows_per_batch=1)
Expected runtime: about 40 s on a quiet 2-core CPU (compile + 2 warmup + 5 timed steps).
Expected result: step time, tokens/s and MFU against the in-process 2048^3 fp32
matmul rate; measured on 2 cores of an AMD EPYC (Zen 5), nothing else running, four
runs: 2.08-2.14 s/step, 956-987 tokens/s, MFU 0.49-0.53 (mean 0.51) against 471-496
GFLOP/s (general path, before dit.segment_blocks). With dit.segment_blocks = 2 (set below),
alternated with the general path in one sitting on the same machine under load (matmul
rate 167-188 GFLOP/s): 3.82-3.94 s against 4.68-5.02 s, MFU 0.61-0.66 of the useful
445.8 GFLOP. The other variants, the side-by-side with the PyTorch peer (`vidsim bench
compare`) and what limits them are in docs/benchmarks.md ("DiT").
"""

from vidsim.config import base_config


def get_config():
  c = base_config()
  c.dit.width = 512
  c.dit.depth = 8
  # The fastest measured on a 2-core CPU (docs/benchmarks.md, "DiT", has the others):
  c.dit.heads = 4  # Head dim 128: half the softmax passes of 8 heads of 64.
  c.dit.mlp = "swiglu"  # XLA:CPU fuses GELU's backward with a transpose into a slow loop.
  c.dit.remat = "dots"  # Recomputing attention is cheaper than storing [layers, R, H, L, L] probabilities.
  c.dit.attention_impl = "einsum"  # Faster than jax.nn.dot_product_attention's XLA path here.
  # The bench rows hold two 512-token segments: run them as blocks of 512 (attention pairs
  # across segments and the unused caption slots are never computed; models/dit.py).
  c.dit.segment_blocks = 2
  c.train.row_tokens = 1024
  c.train.rows_per_batch = 2
  c.train.max_segments_per_row = 4  # Text slots per row: 4 x 64 bytes.
  c.bench.warmup = 2
  c.bench.steps = 5
  return c
