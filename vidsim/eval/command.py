"""`vidsim eval --config F --workdir W [--what vae,loss,probes] [--out-dir D]`.

Writes one JSON file per part under W/eval/ (or D), each number with its protocol:
  vae.json      PSNR and SSIM of the VAE over the eval split (overall, images vs videos,
                per bucket, per frame index) and over a video_folder dataset the config
                names (vidsim/eval/vae.py);
  loss.json     the DiT's flow loss at fixed noise levels on held-out and training
                latents, with the true, null and counterfactual captions (the training
                hook's measure, vidsim/train/dit_hooks.py);
  probes.json   every world probe on generated clips next to its ceiling and chance
                (vidsim/eval/probes.py); probes that do not apply are listed with why.
A part whose checkpoint or cache is missing stops the command with exit 2 before any
work, naming the command to run first.
"""

import json

from etils import epath

from vidsim import mesh as mesh_lib
from vidsim.atomic import write_atomically
from vidsim.errors import UsageError
from vidsim.eval import probes, vae
from vidsim.latents import cache_dir
from vidsim.log import get_logger, is_chief
from vidsim.sample.engine import Engine
from vidsim.train import dit_hooks, dit_loop
from vidsim.train.checkpoint import open_latest
from vidsim.trained import TrainedDiT, TrainedVAE, dit_checkpoints, vae_checkpoints

log = get_logger("eval")

PARTS = ("vae", "loss", "probes")


def parse_what(what: str) -> list:
  parts = [p.strip() for p in what.split(",") if p.strip()]
  unknown = [p for p in parts if p not in PARTS]
  if unknown or not parts:
    raise UsageError(f"--what {what!r}: unknown {unknown}; valid: a comma-separated list of {', '.join(PARTS)}")
  return [p for p in PARTS if p in parts]


def run_eval(args, config):
  parts = parse_what(args.what or config.eval.what)
  workdir = epath.Path(args.workdir)
  out_dir = epath.Path(args.out_dir) if args.out_dir else workdir / "eval"
  check_inputs(config, args.config, workdir, parts)
  mesh = mesh_lib.job_mesh(config)
  results = {}
  if "vae" in parts:
    trained = TrainedVAE(config, workdir, mesh)
    results["vae"] = dict(splits={config.data.eval_split: vae.evaluate_split(config, workdir, mesh,
                                                                              config.data.eval_split, vae=trained)},
                          video_folder=vae.evaluate_video_folder(config, workdir, mesh, vae=trained))
  if "loss" in parts:
    results["loss"] = held_out_loss(config, workdir, mesh)
  if "probes" in parts:
    results["probes"] = world_probes(config, workdir, mesh)
  for part, result in results.items():
    path = out_dir / f"{part}.json"
    if is_chief():
      out_dir.mkdir(parents=True, exist_ok=True)
      write_atomically(path, lambda tmp, r=result: epath.Path(tmp).write_text(json.dumps(r, indent=2) + "\n"))
      log.info("wrote %s", path)
  if is_chief():
    print(summary(results))


def _needs(config, parts) -> list:
  """(what, where, command) of each input the parts read."""
  needs = [("VAE checkpoint", vae_checkpoints, "train-vae")]
  if "loss" in parts:
    needs += [("latent cache", lambda w: cache_dir(w) / "manifest.json", "encode"),
              ("DiT checkpoint", dit_checkpoints, "train")]
  if "probes" in parts and len(probes.skipped_probes(config)) < len(probes.PROBES):
    needs.append(("DiT checkpoint", dit_checkpoints, "train"))
  return needs


def check_inputs(config, config_path, workdir, parts) -> None:
  """UsageError naming the first missing input and the command that makes it."""
  for what, where, command in _needs(config, parts):
    path = where(workdir)
    present = path.exists() if path.name == "manifest.json" else _has_checkpoint(path)
    if not present:
      raise UsageError(f"vidsim eval --what {','.join(parts)} needs the {what} in {path}: run "
                       f"`vidsim {command} --config {config_path} --workdir {workdir}` first")


def _has_checkpoint(directory) -> bool:
  try:
    reader, _ = open_latest(directory, "")
  except UsageError:
    return False
  reader.close()
  return True


def held_out_loss(config, workdir, mesh) -> dict:
  """The DiT's held-out loss at fixed noise (EMA weights, fixed batches), as in training."""
  manifest = dit_loop.check_cache(config, workdir, mesh)
  dit = TrainedDiT(config, workdir, mesh)
  hook = dit_hooks.HeldOutLoss(config, workdir, mesh, dit.graphdef, manifest)
  with mesh_lib.activate(mesh, config):
    metrics = hook({"ema": dit.params}, dit.step)
  return dict(step=dit.step, metrics={k: round(float(v), 5) for k, v in metrics.items()},
              protocol=dict(split=config.data.eval_split, train_split=config.data.train_split,
                            batches=config.train.eval_batches, rows_per_batch=config.train.rows_per_batch,
                            times=list(dit_hooks.EVAL_TIMES), seed=config.seed, weights="EMA",
                            noise="the same for every measure (batch i: key i)"))


def world_probes(config, workdir, mesh) -> dict:
  ec = config.eval
  if len(probes.skipped_probes(config)) == len(probes.PROBES):
    return probes.run_probes(config, None, ec.probe_count, ec.ceiling_count)
  trained_vae, dit = TrainedVAE(config, workdir, mesh), TrainedDiT(config, workdir, mesh)
  engine = Engine(config, mesh, dit.graphdef, dit.params, trained_vae.graphdef, trained_vae.params, trained_vae.shift,
                  trained_vae.scale)
  return probes.run_probes(config, engine, ec.probe_count, ec.ceiling_count, step=dit.step)


def summary(results) -> str:
  """A few lines for the terminal: headline figures of each part."""
  lines = []
  if "vae" in results:
    for split, r in results["vae"]["splits"].items():
      kinds = ", ".join(f"{k} {v['psnr_db']:.2f} dB" for k, v in r["per_kind"].items())
      lines.append(f"vae ({split}, {r['clips']} clips, step {r['step']}): PSNR {r['psnr_db']:.2f} dB, "
                   f"SSIM {r['ssim']:.3f} ({kinds})")
    folder = results["vae"]["video_folder"]
    lines.append(f"vae (video_folder): " + (f"skipped: {folder['skipped']}" if "skipped" in folder
                                             else f"PSNR {folder['psnr_db']:.2f} dB, SSIM {folder['ssim']:.3f}"))
  if "loss" in results:
    m = results["loss"]["metrics"]
    lines.append(f"loss (step {results['loss']['step']}): held-out {m['val_loss']:.4f}")
  if "probes" in results:
    for name, entry in results["probes"]["probes"].items():
      if "skipped" in entry:
        lines.append(f"probe {name}: skipped: {entry['skipped']}")
      else:
        lines.append(f"probe {name}: {_fmt(entry['score'])} (ceiling {_fmt(entry['ceiling'])}, "
                     f"chance {_fmt(entry['chance'])}, n {entry['n']})")
  return "\n".join(lines)


def _fmt(value):
  return "n/a" if value is None else f"{value:.2f}"
