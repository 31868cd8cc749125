"""The causal video VAE (4x8x8, 16 latent channels) trained at 256p on a v5p-32 (16
chips): 33-frame 256x256 clips, one per chip, bf16.

This is the latent space of pod_dit_1b_256p and pod_dit_8b_720p: 33 frames become
9 x 32 x 32 x 16 latents.

Command:
  vidsim compile --config experiments/pod_vae_256p.py --topology v5p-32 --stage vae
Expected runtime: the compile takes about 10 min of CPU (19 min wall on a shared 2-core CPU).
Expected result, what it reports (libtpu 0.0.42.1, jax 0.10.2; 2-core AMD EPYC, 10 min of CPU): fits,
18.8 GiB of 95 GiB HBM per chip (80% headroom; 16.0 GiB temporaries); model FLOPs
9.3e14 a step; estimated step time >= 125 ms, compute-bound, <= 263 frames/s/chip (the
compiler's FLOPs are 0.8% under vidsim's VAE count, so the implied MFU bound reads
~100%: all matmul at peak). A roofline bound, not a measurement.
Second generation:
  vidsim compile --config experiments/pod_vae_256p.py --topology v6e-16 --stage vae
fits, 18.9 GiB of 32 GiB per chip (41% headroom); estimated step time >= 142 ms,
memory-bound (2.3e11 bytes a chip at 1.64 TB/s), MFU <= 45%, <= 233 frames/s/chip: on
v6e this VAE is limited by HBM bandwidth, not by its 918 TFLOP/s (12 min wall, 22 min
of CPU, on the same 2-core EPYC with nothing else running).
"""

from vidsim.config import base_config


def get_config():
  c = base_config()
  c.vae.temporal_compression = 4
  c.vae.spatial_compression = 8
  c.vae.latent_channels = 16
  c.vae.widths = (128, 256, 512, 512)
  c.vae.blocks_per_level = 2
  c.vae.spatial_only_levels = 2
  c.vae.attention = False
  c.vae.dtype = "bfloat16"

  c.data.buckets = ((33, 256, 256),)
  c.data.batch_size = 16
  c.vae_train.learning_rate = 1e-4

  c.mesh.ici.update(dict(data=-1, fsdp=1, sequence=1, tensor=1))
  return c
