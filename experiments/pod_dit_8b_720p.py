"""An ~8B-parameter DiT at 720p over two v5p-256 slices (256 chips): bf16, splash
attention, context parallelism over the sequence axis.

Latents: the 4x8x8, 16-channel latent space of pod_dit_1b_256p. A 5 s clip at 16 fps
(81 frames) at 720x1280 is 21 x 90 x 160 latents; 1x2x2 patches make 21 x 45 x 80 =
75,600 tokens, one clip per 77,824-token row (152 splash tiles of 512; 2.9% padding).
Captions: precomputed 4096-d text embeddings, 128 tokens.

Mesh: the two slices split the rows (mesh.dcn.data=2, gradients all-reduced over DCN);
inside a slice, fsdp=16 shards weights and optimizer state and sequence=8 splits each
row's tokens over 8 chips (9,728 a chip). Self-attention across those 8 chips is
dit.context_parallel=ulysses (all-to-all to head shards): of all_gather, ring and
ulysses it sends the least (see What it reports).

Command:
  vidsim compile --config experiments/pod_dit_8b_720p.py --topology v5p-256 --slices 2
Expected runtime: the compile takes about 3 min of CPU (~18 min wall on a shared 2-core CPU).
Expected result, what it reports (libtpu 0.0.42.1, jax 0.10.2; 2-core AMD EPYC, ~18 min wall on a shared
machine, 3 min of CPU): fits, 27.9 GiB of 95 GiB HBM per chip (71% headroom; remat
"full"); model FLOPs 3.9e17 a step; estimated step time >= 3.69 s (XLA part 1.25 s,
compute-bound; splash kernels 2.44 s), MFU <= 91%, <= 2,640 tokens/s/chip; 105 GiB of
collectives a chip per step (187 ms at ICI rate if not overlapped). With
--config.dit.context_parallel=all_gather: 23.2 GiB, the same bound, 223 GiB of
collectives; ring: 38.6 GiB, >= 11.7 s (its XLA blocks are memory-bound). The estimate
is a roofline bound, not a measurement.
Second generation, 2 x v6e-256 (512 chips: each row split 16 ways, the same 32 rows):
  vidsim compile --config experiments/pod_dit_8b_720p.py --topology v6e-256 --slices 2 \
      --config.mesh.ici.sequence=16
fits, 17.3 GiB of 32 GiB per chip (46% headroom); estimated step time >= 1.37 s
(memory-bound XLA part 0.70 s, splash kernels 0.67 s), MFU <= 61%, <= 3,560
tokens/s/chip; 84 GiB of collectives a chip per step (2 min wall, 3.6 min of CPU, on the
same 2-core EPYC with nothing else running).
"""

import os

from vidsim.config import base_config, load_config


def get_config():
  c = base_config()
  # The latent space: experiments/pod_vae_256p.py's VAE, whose checkpoint encodes the
  # latents (the DiT reads latent_channels and the compression factors).
  c.vae = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pod_vae_256p.py")).vae

  c.dit.patch_size = (1, 2, 2)
  c.dit.width = 4096
  c.dit.depth = 30
  c.dit.heads = 32  # head_dim 128.
  c.dit.mlp = "swiglu"
  c.dit.mlp_ratio = 4.0
  c.dit.position_embedding = "sincos"
  c.dit.dtype = "bfloat16"
  c.dit.attention_impl = "splash"
  c.dit.context_parallel = "ulysses"  # 32 heads / 8 = 4 a chip; see docs/scale.md for the comparison.
  c.dit.remat = "full"

  c.text.encoder = "precomputed"
  c.text.embed_dim = 4096
  c.text.width = 4096
  c.text.max_length = 128

  c.train.row_tokens = 77824
  c.train.max_segments_per_row = 2
  c.train.rows_per_batch = 32
  c.train.learning_rate = 1e-4
  c.train.sample_every = 0

  c.mesh.ici.update(dict(data=1, fsdp=16, sequence=8, tensor=1))
  c.mesh.dcn.update(dict(data=2, fsdp=1, sequence=1, tensor=1))
  return c
