"""The DiT trainer's periodic hooks: held-out loss, sample videos and probe scores.

`training_hooks(...)` returns the [(every, hook)] list the loop runs; each hook is
(state, step) -> metrics dict or None, and reads the EMA weights.

Held-out loss: the DiT's loss on held-out latents, next to the same measure on training latents.

The training loss draws fresh times and noise every step and mixes all timesteps, so
it cannot tell learning from memorising. This hook measures, with the EMA weights
(what sampling uses), the flow loss on the same few packed batches every time:
  - of the held-out split (data.eval_split) and of the training split,
  - with every real token noised to each time in EVAL_TIMES, with the same noise,
  - with the caption, and (held-out only) with the null caption of CFG.
Metrics, logged to metrics.jsonl and TensorBoard at train.eval_every:
  val_loss_tXX, train_loss_tXX   a gap that grows while train falls = memorising;
  val_loss                       their mean over EVAL_TIMES (the headline);
  val_caption_gain_tXX           null-caption loss minus caption loss: how much the
                                 prompt tells the model at that noise level;
  val_<name>_gain_tXX            (moving_digits) loss with captions that get one
                                 attribute wrong (moving_digits.COUNTERFACTUALS: every
                                 direction reversed, every digit changed) minus the
                                 true captions': ~0 while the model ignores that word.
The direction gain is the early sign that motion will follow the prompt: it rises
well before the sampled videos follow their prompts' directions (docs/generate.md).

Samples: text-to-video for each train.sample_prompts, written to W/dit/samples/, and
(on a world with ground truth) probe prompts scored by vidsim/digit_score.py.

World probes (train.probe_every): every probe of `vidsim eval --what probes`, logged as
probe_<name> next to probe_<name>_ceiling.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from vidsim import data as data_lib
from vidsim import digit_score, flow, sizes
from vidsim import latents as latents_lib
from vidsim import mesh as mesh_lib
from vidsim.data import moving_digits, packing, video_io
from vidsim.errors import UsageError
from vidsim.eval import probes
from vidsim.log import get_logger, is_chief
from vidsim.models import text as text_lib
from vidsim.sample.engine import Engine, generate
from vidsim.trained import TrainedVAE

log = get_logger("dit_hooks")
EVAL_TIMES = (0.3, 0.6, 0.9)


def time_name(t: float) -> str:
  return f"t{int(round(t * 100)):02d}"


def fixed_batches(config, workdir, split, manifest, count: int) -> list:
  """The first `count` packed batches (this process's rows) of a split, in a fixed order
  with fixed latent samples: the same on every call."""
  dataset = latents_lib.packed_latents(config, workdir, split, manifest, seed=config.seed)
  iterator = iter(dataset)
  batches = [next(iterator) for _ in range(count)]
  if hasattr(iterator, "close"):  # Stops grain's prefetch thread now, not at interpreter exit.
    iterator.close()
  return batches


def counterfactual_captions(config) -> dict:
  """{name: caption -> wrong caption} for the held-out gains: the world's, when the model reads caption bytes."""
  if not data_lib.dataset_spec(config).world_truth or config.text.encoder != "bytes":
    return {}
  return dict(moving_digits.COUNTERFACTUALS)


def recaption(host_batch, rewrite) -> dict:
  """The host batch with every caption (its text_tokens bytes) passed through `rewrite`."""
  ids = host_batch["text_tokens"]
  captions = text_lib.detokenize_bytes(ids.reshape(-1, ids.shape[-1]))
  new_ids, new_mask = text_lib.tokenize_bytes([rewrite(c) for c in captions], ids.shape[-1])
  return {**host_batch, "text_tokens": new_ids.reshape(ids.shape), "text_mask": new_mask.reshape(ids.shape)}


def make_loss_fn(graphdef, with_null=True):
  """(params, global batch, key) -> {(time, caption_dropped): mean flow loss over real tokens}
  (caption_dropped False only, unless with_null)."""

  def losses(params, batch, key):
    model = nnx.merge(graphdef, params)
    x0 = batch["tokens"]
    real = batch["segment_ids"] > 0
    eps = jax.random.normal(key, x0.shape, x0.dtype)
    text = packing.text_inputs(batch)
    slots = (x0.shape[0], batch["segment_frames"].shape[1])
    out = {}
    for t in EVAL_TIMES:
      t_tokens = jnp.where(real, t, 0.0)
      x_t = flow.noise_tokens(x0, eps, t_tokens)
      for dropped in (False, True) if with_null else (False,):
        v = model(x_t, t_tokens, batch["positions"], batch["segment_ids"], text, jnp.full(slots, dropped),
                  slot_tokens=batch.get("slot_tokens"))
        out[(t, dropped)] = flow.flow_loss(v, eps - x0, real, t_tokens)[0]
    return out

  return losses


class HeldOutLoss:
  """The train loop's hook (state, step) -> metrics; see the module docstring."""

  def __init__(self, config, workdir, mesh, graphdef, manifest):
    self.mesh, self.config = mesh, config
    count = config.train.eval_batches
    self.batches = {
        "val": fixed_batches(config, workdir, config.data.eval_split, manifest, count),
        "train": fixed_batches(config, workdir, config.data.train_split, manifest, count),
    }
    self.losses = jax.jit(make_loss_fn(graphdef))
    self.caption_losses = jax.jit(make_loss_fn(graphdef, with_null=False))
    self.counterfactuals = {name: [recaption(b, rewrite) for b in self.batches["val"]]
                            for name, rewrite in counterfactual_captions(config).items()}

  def _mean_losses(self, params, host_batches, losses):
    totals = {}
    for i, host_batch in enumerate(host_batches):
      batch = mesh_lib.make_global_batch(packing.model_inputs(host_batch), self.mesh, self.config)
      # Batch i always gets key i: the same noise for every measure, so their differences are the captions'.
      values = mesh_lib.to_host(losses(params, batch, jax.random.key(i)))
      for k, v in values.items():
        totals[k] = totals.get(k, 0.0) + float(v) / len(host_batches)
    return totals

  def __call__(self, state, step) -> dict:
    params = state["ema"]
    val = self._mean_losses(params, self.batches["val"], self.losses)
    train = self._mean_losses(params, self.batches["train"], self.losses)
    wrong = {name: self._mean_losses(params, batches, self.caption_losses)
             for name, batches in self.counterfactuals.items()}
    metrics = {}
    for t in EVAL_TIMES:
      name = time_name(t)
      metrics[f"val_loss_{name}"] = val[(t, False)]
      metrics[f"train_loss_{name}"] = train[(t, False)]
      metrics[f"val_caption_gain_{name}"] = val[(t, True)] - val[(t, False)]
      for attribute, losses in wrong.items():
        metrics[f"val_{attribute}_gain_{name}"] = losses[(t, False)] - val[(t, False)]
    metrics["val_loss"] = float(np.mean([val[(t, False)] for t in EVAL_TIMES]))
    log.info("step %d: held-out loss (EMA, fixed noise) %s; train %s", step,
             " ".join(f"{time_name(t)} {val[(t, False)]:.4f}" for t in EVAL_TIMES),
             " ".join(f"{time_name(t)} {train[(t, False)]:.4f}" for t in EVAL_TIMES))
    if wrong:
      t = EVAL_TIMES[-1]
      log.info("step %d: at %s a wrong %s costs %s", step, time_name(t), " / ".join(wrong),
               " / ".join(f"{metrics[f'val_{a}_gain_{time_name(t)}']:+.4f}" for a in wrong))
    return metrics


def held_out_hooks(config, workdir, mesh, graphdef, manifest) -> list:
  """[(train.eval_every, HeldOutLoss)], or [] when off or the cache lacks the eval split."""
  tc = config.train
  if not tc.eval_every or tc.eval_batches < 1:
    return []
  if config.data.eval_split not in manifest["splits"]:
    log.warning("train.eval_every is set but the latent cache has no %r split (it has %s): no held-out loss",
                config.data.eval_split, sorted(manifest["splits"]))
    return []
  return [(tc.eval_every, HeldOutLoss(config, workdir, mesh, graphdef, manifest))]


# ------------------------------------------------------------------ samples


def training_samples(config, workdir, mesh, graphdef, state, step):
  """The train loop's hook: t2v for each config.train.sample_prompts with the EMA
  params, written to W/dit/samples/step_XXXXXX_<i>.gif (and one contact sheet)."""
  s = config.sample
  prompts = list(config.train.sample_prompts)
  try:
    sizes.check_output_size(config, s.frames, s.height, s.width)
    vae = TrainedVAE(config, workdir, mesh)
    engine = Engine(config, mesh, graphdef, state["ema"], vae.graphdef, vae.params, vae.shift, vae.scale)
    generation = generate(engine, "t2v", prompts, frames=s.frames, height=s.height, width=s.width, seed=config.seed,
                          steps=s.steps, sampler=s.sampler, guidance=s.guidance)
  except UsageError as e:
    # A bad sample setting must not end hours of training: say so loudly and train on.
    log.error("step %d: no training samples: %s", step, e)
    return
  out_dir = epath.Path(workdir) / "dit" / "samples"
  if is_chief():
    out_dir.mkdir(parents=True, exist_ok=True)
    extension = ".png" if s.frames == 1 else ".gif"
    paths = video_io.write_outputs(str(out_dir / f"step_{step:06d}{extension}"), generation.videos,
                                   generation.given, s.fps)
    log.info("step %d: samples %s", step, ", ".join(os.path.basename(p) for p in paths))
  if config.train.score_samples and s.frames > 1 and data_lib.dataset_spec(config).world_truth:
    result = probes.score_probe(config, engine, config.train.score_samples)
    log.info("step %d: probe samples (EMA): %s", step, digit_score.summary(result))
    if is_chief():
      line = {"step": step, **digit_score.headline(result)}
      with (out_dir / "scores.jsonl").open("a") as f:
        f.write(json.dumps(line) + "\n")


def sample_hooks(config, workdir, mesh, graphdef) -> list:
  """[(train.sample_every, samples for fixed prompts)], or [] when off."""
  if not config.train.sample_every:
    return []
  return [(config.train.sample_every, lambda state, step: training_samples(config, workdir, mesh, graphdef, state, step))]


def probe_hooks(config, workdir, mesh, graphdef) -> list:
  """[(train.probe_every, world probes)], or [] when off or no probe applies to the dataset.

  The hook runs `vidsim eval --what probes` (vidsim/eval/probes.py) on the EMA weights
  with eval.probe_count clips a probe; its scores and ceilings go to metrics.jsonl and
  TensorBoard as probe_<name> and probe_<name>_ceiling, the whole result to
  W/eval/probes_step_XXXXXX.json."""
  if not config.train.probe_every:
    return []
  skipped = probes.skipped_probes(config)
  if len(skipped) == len(probes.PROBES):
    log.warning("train.probe_every is set but no probe applies: %s", next(iter(skipped.values())))
    return []

  def hook(state, step):
    try:
      vae = TrainedVAE(config, workdir, mesh)
      engine = Engine(config, mesh, graphdef, state["ema"], vae.graphdef, vae.params, vae.shift, vae.scale)
      result = probes.run_probes(config, engine, config.eval.probe_count, config.eval.ceiling_count, step=step)
    except UsageError as e:
      log.error("step %d: no probes: %s", step, e)  # A bad sample setting must not end the training run.
      return None
    if is_chief():
      out = epath.Path(workdir) / "eval" / f"probes_step_{step:06d}.json"
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_text(json.dumps(result, indent=2) + "\n")
    metrics = probes.headline_metrics(result)
    log.info("step %d: probes (EMA) %s", step, ", ".join(f"{k[6:]} {v:.2f}" for k, v in metrics.items()
                                                         if not k.endswith("_ceiling")))
    return metrics

  return [(config.train.probe_every, hook)]


def training_hooks(config, workdir, mesh, graphdef, manifest) -> list:
  """Every periodic hook of the DiT trainer, in the order they run at a step."""
  return (held_out_hooks(config, workdir, mesh, graphdef, manifest) + sample_hooks(config, workdir, mesh, graphdef)
          + probe_hooks(config, workdir, mesh, graphdef))
