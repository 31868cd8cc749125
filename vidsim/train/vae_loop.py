"""Stage 1: train the causal video VAE (`vidsim train-vae --config F --workdir W`).

Reads top to bottom: mesh, input, model, update step, hooks (reconstruction videos,
validation PSNR, latent statistics), then the shared loop (resume, checkpoints,
metrics). Outputs under W/vae/: checkpoints/, metrics.jsonl, tensorboard/, recon/.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from vidsim import mesh as mesh_lib
from vidsim.data import pipeline
from vidsim.data.video_io import write_video
from vidsim.log import get_logger, is_chief, progress
from vidsim.models import vae as vae_lib
from vidsim.train import loop, optim

log = get_logger("vae")

STAGE = "vae"


def run_train_vae(args, config):
  train_vae(config, args.workdir, loop.job_mesh(config))


def run_eval_vae(args, config):
  """`vidsim eval-vae`: PSNR of the trained VAE over a whole split, as JSON on stdout
  and in W/eval/vae_psnr_<split>.json."""
  split = args.split or config.data.eval_split
  result = evaluate_split(config, args.workdir, loop.job_mesh(config), split)
  write_eval(args.workdir, result)
  if is_chief():
    print(json.dumps(result, indent=2))


def build_vae(config):
  return vae_lib.VideoVAE(config, rngs=nnx.Rngs(config.seed))


def abstract_vae(config, mesh):
  """(graphdef, abstract params, param shardings) without allocating the weights."""
  return loop.abstract_model(functools.partial(build_vae, config), config, mesh)


def train_vae(config, workdir, mesh):
  tc = config.vae_train
  with mesh_lib.activate(mesh, config):
    # ------------------------------------------------------------ input
    batch_multiple = mesh_lib.data_parallel_size(mesh, config)
    train_data = iter(pipeline.pixel_dataset(config, config.data.train_split, batch_multiple=batch_multiple))
    eval_batch = next(iter(pipeline.pixel_dataset(config, config.data.eval_split, batch_multiple=batch_multiple)))

    # ------------------------------------------------------------ model and optimizer
    graphdef, abstract_params, param_shardings = abstract_vae(config, mesh)
    optimizer = optim.make_optimizer(tc)

    init_state = functools.partial(init_vae_state, config, optimizer)
    state_shardings = loop.state_shardings(jax.eval_shape(init_state), abstract_params, param_shardings, mesh)
    train_step = make_train_step(config, graphdef, optimizer)

    # ------------------------------------------------------------ batches onto the mesh, and their cost
    def to_global(host_batch):
      return mesh_lib.make_global_batch({"video": host_batch["video"]}, mesh, config)

    def batch_cost(host_batch):
      # Every process holds a batch of the same bucket and size (pipeline.py's global plan).
      clips, frames, height, width, _ = host_batch["video"].shape
      clips *= jax.process_count()
      flops = vae_lib.vae_flops(config, frames, height, width, train=True) * clips
      return flops, {"clips": clips, "frames": clips * frames}

    # ------------------------------------------------------------ hooks
    stage_dir = epath.Path(workdir) / STAGE
    reconstruct = jax.jit(lambda params, video: nnx.merge(graphdef, params).decode(
        nnx.merge(graphdef, params).encode(video)[0]))

    def write_reconstruction(state, step):
      """Validation clips next to their reconstruction (EMA weights), plus val PSNR."""
      video = to_global(eval_batch)["video"]
      recon = reconstruct(state["ema"], video)
      value = float(mesh_lib.to_host(psnr(video, recon)))
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
        max_nonfinite_steps=config.train.max_nonfinite_steps, init_state=init_state,
        state_shardings=state_shardings, train_step=train_step, data_iter=train_data,
        to_global=to_global, batch_cost=batch_cost,
        every=[(tc.recon_every, write_reconstruction)], before_final_save=set_latent_stats,
    )
    state = loop.run(spec, config, workdir, mesh)
    if int(mesh_lib.to_host(state["step"])) == tc.steps:
      if not (stage_dir / "recon" / f"step_{tc.steps:06d}.gif").exists():
        write_reconstruction(state, tc.steps)
      if tc.steps > 0 and not eval_path(workdir, config.data.eval_split).exists():  # 0 steps: no checkpoint.
        result = evaluate_split(config, workdir, mesh, config.data.eval_split)
        write_eval(workdir, result)
        log.info("PSNR over the whole %s split (%d clips, EMA weights): %.2f dB", result["split"], result["clips"], result["psnr_db"])
    return state


def init_vae_state(config, optimizer):
  _, params = nnx.split(build_vae(config), nnx.Param)
  channels = config.vae.latent_channels
  return optim.init_train_state(
      nnx.to_pure_dict(params), optimizer, config.seed,
      latent_shift=jnp.zeros((channels,), jnp.float32),
      latent_scale=jnp.ones((channels,), jnp.float32),
  )


def make_train_step(config, graphdef, optimizer):
  """The pure step (state, {"video"}) -> (state, metrics): reconstruction + beta KL."""

  def train_step(state, batch):
    rng = optim.step_rng(state)

    def loss_fn(params):
      return vae_lib.vae_loss(nnx.merge(graphdef, params), batch["video"], rng, config)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    state, stats = optim.apply_gradients(state, loss, grads, optimizer, config.vae_train.ema_decay)
    return state, {**metrics, **stats}

  return train_step


def psnr(video, recon):
  """PSNR in dB of [-1, 1] videos measured on the [0, 1] scale (MSE pooled over the batch)."""
  return psnr_of_mse(mse_01(video, recon))


def mse_01(video, recon):
  """Mean squared error of [-1, 1] videos on the [0, 1] scale."""
  return jnp.mean(((jnp.clip(recon, -1, 1) - video) / 2.0) ** 2)


def psnr_of_mse(mse):
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


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


# ------------------------------------------------------------------ using a trained VAE


class TrainedVAE:
  """The EMA weights and latent statistics of a finished (or latest) VAE checkpoint,
  replicated on every device so each process can encode and decode on its own."""

  def __init__(self, config, workdir, mesh):
    import hashlib

    from jax.sharding import NamedSharding, PartitionSpec

    from vidsim.train.checkpoint import open_latest

    reader, step = open_latest(epath.Path(workdir) / STAGE / "checkpoints", "VAE",
                               f"run `vidsim train-vae --config ... --workdir {workdir}` first")
    self.graphdef, abstract_params, _ = abstract_vae(config, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    as_target = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)
    channels = (config.vae.latent_channels,)
    target = {
        "ema": jax.tree.map(as_target, abstract_params),
        "latent_shift": as_target(jax.ShapeDtypeStruct(channels, jnp.float32)),
        "latent_scale": as_target(jax.ShapeDtypeStruct(channels, jnp.float32)),
    }
    restored = reader.restore_subset(step, target)
    reader.close()
    # Host copies: processes encode different shards, so they must not share collectives.
    self.params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), restored["ema"])
    self.shift = np.asarray(restored["latent_shift"].addressable_data(0))
    self.scale = np.asarray(restored["latent_scale"].addressable_data(0))
    self.step = step
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves((self.params, self.shift, self.scale)):
      digest.update(np.ascontiguousarray(leaf).tobytes())
    digest.update(repr(sorted(config.vae.to_dict().items())).encode())
    self.fingerprint = digest.hexdigest()[:16]

  def model(self):
    return nnx.merge(self.graphdef, self.params)


def evaluate_split(config, workdir, mesh, split: str) -> dict:
  """The trained VAE's EMA reconstructions of every record of `split`, each exactly once.

  Each record goes to its bucket as the pipeline would put it there without randomness
  (its first frames, centre crop), so the figure is the same on every call and covers
  the whole split, unlike the training hook's one batch. PSNR is pooled MSE (as in the
  hook), overall and per bucket. Every process computes the same result on its own.
  """
  vae = TrainedVAE(config, workdir, mesh)  # Host copies of the weights: no collectives below.
  model = vae.model()
  reconstruct = jax.jit(lambda video: model.decode(model.encode(video)[0]))
  source = pipeline.data_source(config, split)
  buckets = pipeline.check_buckets(config.data.buckets)
  pending = {b: [] for b in range(len(buckets))}
  totals = {b: [0.0, 0, 0] for b in range(len(buckets))}  # squared error, values, clips

  def flush(b):
    video = jnp.asarray(np.stack(pending[b]).astype(np.float32) / 127.5 - 1.0)
    totals[b][0] += float(mse_01(video, reconstruct(video))) * video.size
    totals[b][1] += video.size
    totals[b][2] += len(video)
    pending[b] = []

  for index in progress(range(len(source)), desc=f"evaluate vae on {split}"):
    record = source[index]
    b = pipeline.assign_bucket(int(record["num_frames"]), int(record["height"]), int(record["width"]), buckets)
    window = pipeline.temporal_window(int(record["num_frames"]), buckets[b][0])
    pending[b].append(pipeline.fit_to_bucket(pipeline.decode_example(record, frame_range=window)["video"], buckets[b]))
    if len(pending[b]) == config.data.batch_size:
      flush(b)
  for b in pending:
    if pending[b]:
      flush(b)

  to_db = lambda error, values: round(float(psnr_of_mse(error / values)), 3)
  used = [b for b in totals if totals[b][2]]
  return {
      "split": split,
      "step": vae.step,
      "clips": sum(totals[b][2] for b in used),
      "psnr_db": to_db(sum(totals[b][0] for b in used), sum(totals[b][1] for b in used)),
      "per_bucket": {"x".join(map(str, buckets[b])): {"clips": totals[b][2], "psnr_db": to_db(*totals[b][:2])} for b in used},
  }


def eval_path(workdir, split: str):
  """Where evaluations go (DESIGN.md: W/eval/*.json)."""
  return epath.Path(workdir) / "eval" / f"vae_psnr_{split}.json"


def write_eval(workdir, result: dict) -> None:
  if is_chief():
    path = eval_path(workdir, result["split"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
