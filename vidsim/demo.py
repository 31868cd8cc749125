"""`vidsim demo [--config F] [--workdir W]`: every stage, end to end, on the embedded world.

prepare data -> train the VAE -> build the latent cache -> train the DiT -> sample
every task -> score probe samples against their prompts -> W/report.html. Each stage resumes: re-running skips finished work
(checkpoints at their last step, committed cache shards, existing sample files).
"""

import time

from etils import epath

from vidsim import config as config_lib
from vidsim import mesh as mesh_lib
from vidsim import runtime
from vidsim.log import get_logger

log = get_logger("demo")

DEFAULT_CONFIG = "experiments/digits_demo.py"


def run_demo(args, config):
  if config is None:
    path = epath.Path(DEFAULT_CONFIG)
    if not path.exists():
      path = epath.Path(__file__).parent.parent / DEFAULT_CONFIG
    config = config_lib.load_config(str(path))
    runtime.start(args, config)  # The CLI started the cache only for an explicit --config.
  mesh_lib.init_distributed(config)
  workdir = epath.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = mesh_lib.make_mesh(config)
  log.info("demo: workdir %s, mesh %s", workdir, mesh_lib.describe(mesh))
  timings = {}

  def stage(name, fn):
    start = time.perf_counter()
    log.info("demo: stage %s", name)
    fn()
    timings[name] = time.perf_counter() - start
    log.info("demo: stage %s done in %.0f s", name, timings[name])

  from vidsim.data import commands as data_commands
  from vidsim.latents import encode_cache
  from vidsim.train.dit_loop import train_dit
  from vidsim.train.vae_loop import train_vae

  def train(name, fn, steps):
    # A SIGTERM ends a training stage early with a checkpoint; the later stages would
    # then sample from a half-trained model, so the demo stops too (a re-run resumes).
    state = {}
    stage(name, lambda: state.update(fn()))
    step = int(mesh_lib.to_host(state["step"]))
    if step < steps:
      log.warning("demo: %s stopped at step %d of %d; run the same command again to resume", name, step, steps)
    return step >= steps

  stage("data", lambda: data_commands.prepare(config))
  if not train("train-vae", lambda: train_vae(config, workdir, mesh), config.vae_train.steps):
    return
  stage("encode", lambda: encode_cache(config, workdir, mesh))
  if not train("train", lambda: train_dit(config, workdir, mesh), config.train.steps):
    return
  from vidsim import report, sample

  outputs, notes = [], []

  def score():
    item, lines = sample.demo_probe(config, workdir, mesh)
    outputs.extend([item] if item else [])
    notes.extend(lines)

  stage("sample", lambda: outputs.extend(sample.demo_samples(config, workdir, mesh)))
  stage("score", score)
  stage("report", lambda: report.write_report(config, workdir, outputs, timings, notes))
  log.info("demo: done in %.0f s; open %s", sum(timings.values()), workdir / "report.html")
