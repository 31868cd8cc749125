"""A ~1B-parameter DiT at 256p for a v5p-64 (32 chips): bf16, splash attention, a 5 s
clip to an 8k-token row.

Latents: a 4x8x8 causal VAE with 16 channels (Wan / Open-Sora 2.0 class). A 5 s clip at
24 fps (121 frames) at 256x256 is 31 x 32 x 32 latents; 1x2x2 patches make 31 x 256 =
7,936 tokens: one to an 8,192-token row (3% padding); shorter clips and images share
rows (up to 8 segments). Rows are no longer than a long clip because the splash
kernel computes every block of a row's square whatever the packing: two 8k clips in a
16k row would cost twice the attention FLOPs of two 8k rows. Captions are precomputed by an offline text encoder
(4096-d, T5-XXL / umT5 class) and cached with the latents, 128 tokens a caption.

Mesh: fsdp over all 32 chips (weights, EMA and Adam moments sharded 32 ways), two rows
(16k tokens) per chip per step.

Command:
  vidsim compile --config experiments/pod_dit_1b_256p.py --topology v5p-64
Expected runtime: the compile takes about 2 min of CPU (450 s wall on a shared 2-core CPU).
Expected result, what it reports (libtpu 0.0.42.1, jax 0.10.2; 2-core AMD EPYC, 450 s wall on a shared
machine): fits, 72.0 GiB of 95 GiB HBM per chip (24% headroom; 71.4 GiB of it
temporaries, the activations kept for the backward pass: remat "dots" trades them for
recompute); model FLOPs 5.0e15 a step; estimated step time >= 437 ms (memory-bound
XLA part 308 ms + splash kernels 129 ms), MFU <= 78%, <= 37,500 tokens/s/chip; 9 GiB of
fsdp collectives per chip. The estimate is a roofline bound, not a measurement.
Second generation (32 GiB chips: one row a chip and full remat; docs/scale.md):
  vidsim compile --config experiments/pod_dit_1b_256p.py --topology v6e-64 \
      --config.train.rows_per_batch=64 --config.dit.remat=full
fits, 3.7 GiB of 32 GiB per chip (89% headroom); estimated step time >= 242 ms,
memory-bound, MFU <= 35%, <= 33,900 tokens/s/chip (v6e has twice v5p's peak but 0.6x
its HBM bandwidth).
"""

import os

from vidsim.config import base_config, load_config


def get_config():
  c = base_config()
  # The latent space: experiments/pod_vae_256p.py's VAE, whose checkpoint encodes the
  # latents (the DiT reads latent_channels and the compression factors).
  c.vae = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pod_vae_256p.py")).vae

  c.dit.patch_size = (1, 2, 2)
  c.dit.width = 2048
  c.dit.depth = 16
  c.dit.heads = 16  # head_dim 128: the MXU's width, and splash's.
  c.dit.mlp = "swiglu"
  c.dit.mlp_ratio = 4.0
  c.dit.position_embedding = "sincos"
  c.dit.dtype = "bfloat16"
  c.dit.attention_impl = "splash"
  c.dit.remat = "none"

  c.text.encoder = "precomputed"
  c.text.embed_dim = 4096
  c.text.width = 2048
  c.text.max_length = 128

  c.train.row_tokens = 8192
  c.train.max_segments_per_row = 8
  c.train.rows_per_batch = 64
  c.train.grad_accum = 1
  c.train.learning_rate = 1e-4
  c.train.sample_every = 0

  c.mesh.ici.update(dict(data=1, fsdp=-1, sequence=1, tensor=1))
  return c
