"""`vidsim eval-vae`: PSNR of the trained VAE over a whole split, every clip once.

Writes W/eval/vae_psnr_<split>.json (and prints it): PSNR (as defined in vidsim/quality.py)
and SSIM (dm-pix) overall, for images vs videos, per bucket and per frame index, with
the EMA weights. `vidsim eval --what vae` writes the same figures to W/eval/vae.json,
with those of a video_folder dataset the config names.
"""

import copy
import json

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from vidsim import mesh as mesh_lib
from vidsim import quality
from vidsim.data import pipeline
from vidsim.errors import UsageError
from vidsim.log import is_chief, progress
from vidsim.trained import TrainedVAE


def run_eval_vae(args, config):
  split = args.split or config.data.eval_split
  result = evaluate_split(config, args.workdir, mesh_lib.job_mesh(config), split)
  write_eval(args.workdir, result)
  if is_chief():
    print(json.dumps(result, indent=2))


def evaluate_split(config, workdir, mesh, split: str, vae=None) -> dict:
  """The trained VAE's EMA reconstructions of every record of `split`, each exactly once.

  Each record goes to its bucket as the pipeline would put it there without randomness
  (its first frames, centre crop), so the figure is the same on every call and covers
  the whole split, unlike the training hook's one batch. PSNR is pooled MSE (as in the
  hook), overall, per bucket and for images vs videos; per video bucket also per frame
  index (the PSNR curve over a clip: a causal VAE is often worst on its first frames).
  SSIM (dm-pix, Gaussian window of 11 px, or the frame's shorter side when smaller) is
  the mean over every frame. Every process computes the same result on its own.
  """
  vae = vae or TrainedVAE(config, workdir, mesh)  # Host copies of the weights: no collectives below.
  model = vae.model()
  reconstruct = jax.jit(lambda video: model.decode(model.encode(video)[0]))
  source = pipeline.data_source(config, split)
  buckets = pipeline.check_buckets(config.data.buckets)
  pending = {b: [] for b in range(len(buckets))}
  # Per bucket: squared error and value count per frame index, SSIM sum over frames, clips.
  totals = {b: dict(error=np.zeros(buckets[b][0]), values=np.zeros(buckets[b][0]), ssim=0.0, clips=0)
            for b in range(len(buckets))}

  def flush(b):
    video = jnp.asarray(np.stack(pending[b]).astype(np.float32) / 127.5 - 1.0)
    recon = reconstruct(video)
    per_frame = np.asarray(jnp.sum(quality.squared_error_01(video, recon), axis=(0, 2, 3, 4)))
    totals[b]["error"] += per_frame
    totals[b]["values"] += video.size / video.shape[1]
    totals[b]["ssim"] += float(jnp.sum(_ssim(video, recon)))
    totals[b]["clips"] += len(video)
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
  used = [b for b in totals if totals[b]["clips"]]

  def pooled(group):
    frames = sum(totals[b]["clips"] * buckets[b][0] for b in group)
    return dict(clips=sum(totals[b]["clips"] for b in group),
                psnr_db=to_db(sum(totals[b]["error"].sum() for b in group), sum(totals[b]["values"].sum() for b in group)),
                ssim=round(sum(totals[b]["ssim"] for b in group) / frames, 4))

  per_bucket = {}
  for b in used:
    entry = pooled([b])
    if buckets[b][0] > 1:
      entry["psnr_db_per_frame"] = [to_db(e, v) for e, v in zip(totals[b]["error"], totals[b]["values"])]
    per_bucket["x".join(map(str, buckets[b]))] = entry
  kinds = {"images": [b for b in used if buckets[b][0] == 1], "videos": [b for b in used if buckets[b][0] > 1]}
  return {
      "split": split,
      "step": vae.step,
      **pooled(used),
      "per_kind": {kind: pooled(group) for kind, group in kinds.items() if group},
      "per_bucket": per_bucket,
      "protocol": dict(split=split, clips="every record once", crop="first frames, centre", weights="EMA",
                       psnr="pooled MSE on [0, 1] (vidsim/quality.py)", ssim="dm_pix.ssim per frame, mean"),
  }


def _ssim(video, recon):
  """SSIM per frame [N * T] of [-1, 1] clips [N, T, H, W, 3] on the [0, 1] scale (dm-pix)."""
  a = (video.reshape((-1,) + video.shape[2:]) + 1.0) / 2.0
  b = (jnp.clip(recon, -1.0, 1.0).reshape(a.shape) + 1.0) / 2.0
  return pix.ssim(a, b, max_val=1.0, filter_size=min(11, *a.shape[1:3]))


def evaluate_video_folder(config, workdir, mesh, vae=None) -> dict:
  """evaluate_split on the eval split of the `video_folder` dataset the config names
  (video_folder.path) when it is not the training dataset; {"skipped": why} otherwise."""
  if not config.video_folder.path:
    return dict(skipped="video_folder.path is not set")
  if config.data.builder == "video_folder":
    return dict(skipped="video_folder is the configured dataset: its figures are those of the split above")
  folder = copy.deepcopy(config)
  folder.data.builder = "video_folder"
  try:
    pipeline.data_source(folder, folder.data.eval_split, build=False)
  except UsageError as e:
    return dict(skipped=str(e))
  return dict(evaluate_split(folder, workdir, mesh, folder.data.eval_split, vae=vae), path=config.video_folder.path)


def eval_path(workdir, split: str):
  """W/eval/vae_psnr_<split>.json."""
  return epath.Path(workdir) / "eval" / f"vae_psnr_{split}.json"


def write_eval(workdir, result: dict) -> None:
  if is_chief():
    path = eval_path(workdir, result["split"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
