"""Stage 2: train the DiT on the latent cache (`vidsim train --config F --workdir W`).

Reads top to bottom: mesh, the VAE the cache must come from, input (latent cache ->
packed rows), model and update step (vidsim/train/stage.py, vidsim/train/dit_step.py),
hooks (held-out loss, sample videos: vidsim/train/dit_hooks.py), then the shared loop.
Outputs under W/dit/.
"""

import jax
import numpy as np

from vidsim import latents as latents_lib
from vidsim import mesh as mesh_lib
from vidsim import text_cache
from vidsim.data import packing
from vidsim.errors import UsageError
from vidsim.log import get_logger
from vidsim.train import dit_hooks, dit_step, loop
from vidsim.train.stage import assemble
from vidsim.trained import TrainedVAE

log = get_logger("dit")

STAGE = "dit"


def run_train(args, config):
  train_dit(config, args.workdir, mesh_lib.job_mesh(config))


def check_cache(config, workdir, mesh):
  """The cache's manifest, after checking it was made by the configured VAE and holds the
  configured text (text.embed_dim, when 0, becomes the cached embeddings' size)."""
  vae = TrainedVAE(config, workdir, mesh)
  manifest = latents_lib.load_manifest(workdir, expected_fingerprint=vae.fingerprint)
  if config.text.encoder == "precomputed":
    # The embeddings sit beside the latents (`vidsim embed-text`), whichever text the latents hold.
    text_cache.resolve_embed_dim(config, text_cache.load_manifest(workdir, config))
  elif manifest["text_encoder"] != config.text.encoder:
    raise UsageError(
        f"latent cache holds text for encoder {manifest['text_encoder']!r}, config.text.encoder is "
        f"{config.text.encoder!r}: re-encode or change the config"
    )
  return manifest


def packed_batches(config, workdir, split, manifest, mesh, seed):
  """Iterator of this process's rows of globally planned packed batches; its state is one
  global stream position, so it resumes on any process count (vidsim/data/packing.py)."""
  dit_step.check_rows_per_batch(config, mesh, jax.process_count())
  return iter(latents_lib.packed_latents(config, workdir, split, manifest, seed=seed))


def train_dit(config, workdir, mesh):
  tc = config.train
  with mesh_lib.activate(mesh, config):
    # ------------------------------------------------------------ input
    manifest = check_cache(config, workdir, mesh)
    train_data = packed_batches(config, workdir, config.data.train_split, manifest, mesh, config.seed)

    # ------------------------------------------------------------ model, optimizer, update step
    stage = assemble(config, mesh, STAGE)

    # ------------------------------------------------------------ batches onto the mesh, and their cost
    def to_global(host_batch):
      return mesh_lib.make_global_batch(packing.model_inputs(host_batch), mesh, config)

    def batch_cost(host_batch):
      segment_ids = host_batch["segment_ids"]
      units = {"tokens": int(np.sum(segment_ids > 0)), "token_slots": int(segment_ids.size)}
      return dit_step.flops_for_batch(config, host_batch), units

    def packing_efficiency(units):
      return {"packing_efficiency": units["tokens"] / max(units["token_slots"], 1)}

    spec = loop.StageSpec(
        name=STAGE, steps=tc.steps, log_every=tc.log_every, checkpoint_every=tc.checkpoint_every,
        max_nonfinite_steps=tc.max_nonfinite_steps, init_state=stage.init_state,
        state_shardings=stage.state_shardings, train_step=stage.train_step, data_iter=train_data,
        to_global=to_global, batch_cost=batch_cost, summarize_units=packing_efficiency,
        every=dit_hooks.training_hooks(config, workdir, mesh, stage.graphdef, manifest),
    )
    return loop.run(spec, config, workdir, mesh)
