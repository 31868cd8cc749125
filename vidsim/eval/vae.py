"""`vidsim eval-vae`: PSNR of the trained VAE over a whole split, every clip once.

Writes W/eval/vae_psnr_<split>.json (and prints it): overall and per bucket, with the
EMA weights, PSNR as defined in vidsim/quality.py.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from vidsim import mesh as mesh_lib
from vidsim import quality
from vidsim.data import pipeline
from vidsim.log import is_chief, progress
from vidsim.trained import TrainedVAE


def run_eval_vae(args, config):
  split = args.split or config.data.eval_split
  result = evaluate_split(config, args.workdir, mesh_lib.job_mesh(config), split)
  write_eval(args.workdir, result)
  if is_chief():
    print(json.dumps(result, indent=2))


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
    totals[b][0] += float(quality.mse_01(video, reconstruct(video))) * video.size
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

  to_db = lambda error, values: round(float(quality.psnr_of_mse(error / values)), 3)
  used = [b for b in totals if totals[b][2]]
  return {
      "split": split,
      "step": vae.step,
      "clips": sum(totals[b][2] for b in used),
      "psnr_db": to_db(sum(totals[b][0] for b in used), sum(totals[b][1] for b in used)),
      "per_bucket": {"x".join(map(str, buckets[b])): {"clips": totals[b][2], "psnr_db": to_db(*totals[b][:2])} for b in used},
  }


def eval_path(workdir, split: str):
  """W/eval/vae_psnr_<split>.json."""
  return epath.Path(workdir) / "eval" / f"vae_psnr_{split}.json"


def write_eval(workdir, result: dict) -> None:
  if is_chief():
    path = eval_path(workdir, result["split"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
