"""Stage 1: train the causal video VAE (`vidsim train-vae --config F --workdir W`).

Reads top to bottom: mesh, input, model and update step (vidsim/train/stage.py), hooks
(reconstruction videos, validation PSNR, latent statistics), then the shared loop
(resume, checkpoints, metrics). Outputs under W/vae/: checkpoints/, metrics.jsonl,
tensorboard/, recon/.
"""

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from vidsim import mesh as mesh_lib
from vidsim import quality
from vidsim.data import pipeline
from vidsim.data.video_io import write_video
from vidsim.eval import vae as vae_eval
from vidsim.log import get_logger, is_chief
from vidsim.models import vae as vae_lib
from vidsim.quick_jit import quick_jit
from vidsim.train import loop
from vidsim.train.stage import assemble

log = get_logger("vae")

STAGE = "vae"


def run_train_vae(args, config):
  train_vae(config, args.workdir, mesh_lib.job_mesh(config))


def train_vae(config, workdir, mesh):
  tc = config.vae_train
  with mesh_lib.activate(mesh, config):
    # ------------------------------------------------------------ input
    batch_multiple = mesh_lib.data_parallel_size(mesh, config)
    train_data = iter(pipeline.pixel_dataset(config, config.data.train_split, batch_multiple=batch_multiple))
    eval_batch = next(iter(pipeline.pixel_dataset(config, config.data.eval_split, batch_multiple=batch_multiple)))

    # ------------------------------------------------------------ model, optimizer, update step
    stage = assemble(config, mesh, STAGE)
    graphdef = stage.graphdef

    # ------------------------------------------------------------ batches onto the mesh, and their cost
    def to_global(host_batch):
      return mesh_lib.make_global_batch({"video": host_batch["video"]}, mesh, config)

    def batch_cost(host_batch):
      clips, frames, height, width, _ = host_batch["video"].shape
      flops = vae_lib.vae_flops(config, frames, height, width, train=True) * clips
      return flops, {"clips": clips, "frames": clips * frames}

    # ------------------------------------------------------------ hooks
    stage_dir = epath.Path(workdir) / STAGE
    reconstruct = quick_jit(lambda params, video: nnx.merge(graphdef, params).decode(
        nnx.merge(graphdef, params).encode(video)[0]))

    def write_reconstruction(state, step):
      """Validation clips next to their reconstruction (EMA weights), plus val PSNR."""
      video = to_global(eval_batch)["video"]
      recon = reconstruct(state["ema"], video)
      value = float(mesh_lib.to_host(quality.psnr(video, recon)))
      log.info("step %d: validation PSNR %.2f dB (EMA weights)", step, value)
      video, recon = mesh_lib.to_host((video, recon))
      if is_chief():
        grid = side_by_side(video[:4], recon[:4])
        out = stage_dir / "recon" / f"step_{step:06d}.gif"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_video(out, grid, fps=float(eval_batch["fps"][0]))
        (stage_dir / "recon" / "val_psnr.jsonl").open("a").write(f'{{"step": {step}, "val_psnr": {value:.4f}}}\n')

    def set_latent_stats(state):
      shift, scale = latent_stats(config, graphdef, state["ema"], mesh)
      log.info("latent stats: shift %s scale %s", np.round(shift, 3), np.round(scale, 3))
      return dict(state, latent_shift=jnp.asarray(shift), latent_scale=jnp.asarray(scale))

    spec = loop.StageSpec(
        name=STAGE, steps=tc.steps, log_every=tc.log_every, checkpoint_every=tc.checkpoint_every,
        max_nonfinite_steps=config.train.max_nonfinite_steps, init_state=stage.init_state,
        state_shardings=stage.state_shardings, train_step=stage.train_step, data_iter=train_data,
        to_global=to_global, batch_cost=batch_cost,
        every=[(tc.recon_every, write_reconstruction)], before_final_save=set_latent_stats,
    )
    state = loop.run(spec, config, workdir, mesh)
    if int(mesh_lib.to_host(state["step"])) == tc.steps:
      if not (stage_dir / "recon" / f"step_{tc.steps:06d}.gif").exists():
        write_reconstruction(state, tc.steps)
      if tc.final_eval and tc.steps > 0 and not vae_eval.eval_path(workdir, config.data.eval_split).exists():  # 0 steps: no checkpoint.
        result = vae_eval.evaluate_split(config, workdir, mesh, config.data.eval_split)
        vae_eval.write_eval(workdir, result)
        log.info("PSNR over the whole %s split (%d clips, EMA weights): %.2f dB", result["split"], result["clips"], result["psnr_db"])
    return state


def side_by_side(video, recon):
  """uint8 [T, H', W', 3] frames: each input clip left of its reconstruction, clips stacked."""
  to_uint8 = lambda x: np.clip((x + 1.0) * 127.5, 0, 255).astype(np.uint8)
  pairs = [np.concatenate([to_uint8(v), to_uint8(r)], axis=2) for v, r in zip(video, recon)]
  return np.concatenate(pairs, axis=1)


def latent_stats(config, graphdef, params, mesh, batches: int = 8):
  """Per-channel shift and scale of posterior samples over `batches` training batches
  (EMA weights; formula in vae.latent_stats_from_sums). Deterministic: a fresh, seeded iterator."""
  data = iter(pipeline.pixel_dataset(
      config, config.data.train_split, batch_multiple=mesh_lib.data_parallel_size(mesh, config), seed=config.seed + 1))

  @jax.jit
  def moments(p, video):
    mean, logvar = nnx.merge(graphdef, p).encode(video)
    mean = mean.astype(jnp.float32)
    axes = tuple(range(mean.ndim - 1))
    return jnp.sum(mean, axes), jnp.sum(mean**2, axes), jnp.sum(jnp.exp(logvar.astype(jnp.float32)), axes)

  totals = np.zeros((3, config.vae.latent_channels), np.float64)
  count = 0
  for _ in range(batches):
    host = next(data)
    video = mesh_lib.make_global_batch({"video": host["video"]}, mesh, config)["video"]
    totals += np.asarray(mesh_lib.to_host(moments(params, video)), np.float64)
    latent = vae_lib.latent_shape(config, *video.shape[1:4])
    count += video.shape[0] * int(np.prod(latent[:3]))
  return vae_lib.latent_stats_from_sums(*totals, count)
