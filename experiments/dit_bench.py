"""DiT speed benchmark: a block stack large enough to be matmul-bound on a CPU.

Command:
  vidsim bench dit --config experiments/dit_bench.py --out /tmp/dit_bench.json
  (one row per step: --config.train.rows_per_batch=1)
Expected runtime: about a minute on a quiet 2-core CPU (compile + 2 warmup + 5 timed steps).
Expected result: step time, tokens/s and MFU against the in-process 2048^3 fp32
matmul rate; the figures and what limits them are in docs/benchmarks.md ("## DiT").
"""

from vidsim.config import base_config


def get_config():
  c = base_config()
  c.dit.width = 512
  c.dit.depth = 8
  c.dit.heads = 8
  c.dit.remat = "none"
  c.dit.attention_impl = "einsum"  # 1.8x faster than jax.nn.dot_product_attention's XLA path here.
  c.train.row_tokens = 1024
  c.train.rows_per_batch = 2
  c.train.max_segments_per_row = 4  # Text slots per row: 4 x 64 bytes.
  c.bench.warmup = 2
  c.bench.steps = 5
  return c
