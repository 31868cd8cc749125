"""`vidsim demo [--config F] [--workdir W]`: every stage, end to end, on the embedded world.

prepare data -> train the VAE -> build the latent cache -> train the DiT -> sample
every task -> score probe samples against their prompts -> W/report.html. Each stage resumes: re-running skips finished work
(checkpoints at their last step, committed cache shards, existing sample files).
"""

import json
import time

import numpy as np
from etils import epath

from vidsim import config as config_lib
from vidsim import data as data_lib
from vidsim import digit_score, latents, report
from vidsim import mesh as mesh_lib
from vidsim import runtime
from vidsim.atomic import write_atomically
from vidsim.data import commands as data_commands
from vidsim.data import moving_digits, video_io
from vidsim.eval import probes
from vidsim.log import get_logger, is_chief, progress
from vidsim.sample.engine import Engine, generate
from vidsim.train import dit_loop, vae_loop

log = get_logger("demo")

DEFAULT_CONFIG = "experiments/digits_demo.py"


def run_demo(args, config):
  if config is None:
    path = epath.Path(DEFAULT_CONFIG)
    if not path.exists():
      path = epath.Path(__file__).parent.parent / DEFAULT_CONFIG
    config = config_lib.load_config(str(path))
    runtime.start(args, config)  # The CLI started the cache only for an explicit --config.
  mesh = mesh_lib.job_mesh(config)
  workdir = epath.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  log.info("demo: workdir %s", workdir)
  timings = {}

  def stage(name, fn):
    start = time.perf_counter()
    log.info("demo: stage %s", name)
    fn()
    timings[name] = time.perf_counter() - start
    log.info("demo: stage %s done in %.0f s", name, timings[name])

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
  if not train("train-vae", lambda: vae_loop.train_vae(config, workdir, mesh), config.vae_train.steps):
    return
  stage("encode", lambda: latents.encode_cache(config, workdir, mesh))
  if not train("train", lambda: dit_loop.train_dit(config, workdir, mesh), config.train.steps):
    return
  outputs, notes = [], []

  def score():
    item, lines = demo_probe(config, workdir, mesh)
    outputs.extend([item] if item else [])
    notes.extend(lines)

  stage("sample", lambda: outputs.extend(demo_samples(config, workdir, mesh)))
  stage("score", score)
  stage("report", lambda: report.write_report(config, workdir, outputs, timings, notes))
  log.info("demo: done in %.0f s; open %s", sum(timings.values()), workdir / "report.html")


# ------------------------------------------------------------------ the demo's samples


def _demo_shapes(config):
  """(frames, height, width) of square, wide and vertical t2v: the sample size and the
  first wide / tall video buckets the model trained on (None if it saw neither)."""
  s = config.sample
  square = (s.frames, s.height, s.width)
  videos = [tuple(b) for b in config.data.buckets if b[0] > 1]
  wide = next((b for b in videos if b[2] > b[1]), None)
  tall = next((b for b in videos if b[1] > b[2]), None)
  # Without a bucket of one orientation, the other turned on its side (RoPE takes any shape).
  wide = wide or (tall and (tall[0], tall[2], tall[1]))
  tall = tall or (wide and (wide[0], wide[2], wide[1]))
  return square, wide, tall


def _demo_scene(config, seed, frames, height, width):
  md = config.moving_digits
  video, caption, _ = moving_digits.render_scene(
      np.random.default_rng(seed), split=config.data.eval_split, frames=frames, height=height, width=width,
      digit_size=md.digit_size, max_digits=1, speed=tuple(md.speed), colors=tuple(md.colors), paths=md.paths)
  return video, caption


def _recolour(caption, colors):
  """The caption with its first colour word swapped for another (the edit prompt)."""
  for i, colour in enumerate(colors):
    if f" {colour} " in f" {caption} ":
      return f" {caption} ".replace(f" {colour} ", f" {colors[(i + 1) % len(colors)]} ", 1).strip()
  return caption


def demo_samples(config, workdir, mesh) -> list:
  """Every task once on the embedded world (for `vidsim demo`), under W/samples/.

  Inputs are rendered moving_digits validation scenes (written next to the outputs);
  outputs are GIFs (they play in any browser) or PNGs, each with a contact sheet.
  Existing outputs are kept, so a re-run resumes. Returns the report's items:
  dicts with task, prompt, output, sheet, inputs, note."""
  s = config.sample
  out_dir = epath.Path(workdir) / "samples"
  (out_dir / "inputs").mkdir(parents=True, exist_ok=True)
  square, wide, tall = _demo_shapes(config)
  frames, height, width = square
  scene_a, caption_a = _demo_scene(config, 1, frames, height, width)
  scene_b, caption_b = _demo_scene(config, 2, frames, height, width)
  inputs = {"a.gif": scene_a, "b.gif": scene_b}
  for name, video in inputs.items():
    write_atomically(str(out_dir / "inputs" / name), lambda tmp, v=video: video_io.write_video(tmp, v, s.fps))
  write_atomically(str(out_dir / "inputs" / "a_first.png"), lambda tmp: video_io.write_png(tmp, scene_a[0]))
  a, b, a_first = (str(out_dir / "inputs" / n) for n in ("a.gif", "b.gif", "a_first.png"))
  longer = 1 + 2 * (frames - 1)
  prompt = config.train.sample_prompts[0] if config.train.sample_prompts else caption_a
  size = dict(height=height, width=width)
  jobs = [
      ("t2v", "t2v_square.gif", prompt, dict(frames=frames, **size), [], "square"),
      ("t2i", "t2i.png", prompt, dict(frames=1, **size), [], "one frame"),
      ("i2v", "i2v.gif", caption_a, dict(frames=frames, image=scene_a[0], **size), [a_first],
       "the first frame is given"),
      ("extend-forward", "extend_forward.gif", caption_a, dict(frames=longer, video=scene_a, **size), [a],
       f"{frames} given frames continued to {longer}"),
      ("extend-backward", "extend_backward.gif", caption_a, dict(frames=longer, video=scene_a, **size), [a],
       f"{longer - frames} frames made before the input"),
      ("loop", "loop.gif", prompt, dict(frames=frames, **size), [], "the end leads back into the start"),
      ("edit", "edit.gif", _recolour(caption_a, tuple(config.moving_digits.colors)),
       dict(frames=frames, video=scene_a, strength=s.edit_strength, **size), [a],
       f"SDEdit at strength {s.edit_strength}"),
      ("connect", "connect.gif", f"{caption_a}, then {caption_b}",
       dict(frames=s.window_frames or frames, video=scene_a, video2=scene_b, **size), [a, b],
       "starts from the first clip's end, arrives at the second's start"),
  ]
  for i, (name, shape) in enumerate((("wide", wide), ("vertical", tall))):
    if shape is not None:
      jobs.insert(1 + i, ("t2v", f"t2v_{name}.gif", prompt, dict(frames=shape[0], height=shape[1], width=shape[2]), [],
                      f"{name} {shape[2]}x{shape[1]}"))
  engine = None
  items = []
  for task, file_name, text, kwargs, input_paths, note in progress(jobs, total=len(jobs), desc="sample tasks"):
    out = out_dir / file_name
    if not out.exists():
      engine = engine or Engine.from_workdir(config, workdir, mesh)
      generation = generate(engine, task, [text], seed=config.seed, steps=s.steps, sampler=s.sampler,
                            guidance=s.guidance, **kwargs)
      if is_chief():
        video_io.write_outputs(str(out), generation.videos, generation.given, s.fps)
    items.append(dict(task=task, prompt=text, output=str(out), sheet=video_io.sheet_path(out), inputs=input_paths,
                      note=note))
  return items


def demo_probe(config, workdir, mesh, count: int = 20):
  """The demo's sample-quality figures: t2v for `count` probe prompts, scored against
  them and against the scorer's reading of true clips of the same size. Writes
  W/samples/probe.sheet.png and W/eval/probe_scores.json (kept: a re-run reads it).
  Returns (report item, honest-summary lines); (None, []) off the moving_digits world."""
  if not data_lib.dataset_spec(config).world_truth or config.sample.frames == 1:
    return None, []
  s = config.sample
  sheet = epath.Path(workdir) / "samples" / "probe.sheet.png"
  scores = epath.Path(workdir) / "eval" / "probe_scores.json"
  if scores.exists() and sheet.exists():
    saved = json.loads(scores.read_text())
  else:
    result = probes.score_probe(config, Engine.from_workdir(config, workdir, mesh), count)
    truth = digit_score.reference(s.frames, s.height, s.width, config.moving_digits)
    saved = dict(samples=digit_score.headline(result), true_clips=digit_score.headline(truth),
                 rows=result["rows"], steps=s.steps, guidance=s.guidance)
    if is_chief():
      scores.parent.mkdir(parents=True, exist_ok=True)
      blank = np.zeros(s.frames, bool)
      write_atomically(str(sheet), lambda tmp: video_io.write_png(tmp, video_io.contact_sheet(result["videos"], blank)))
      write_atomically(str(scores), lambda tmp: epath.Path(tmp).write_text(json.dumps(saved, indent=2) + "\n"))
  samples, truth = saved["samples"], saved["true_clips"]
  note = (f"Scored automatically (vidsim/digit_score.py) on {samples['clips']} one-digit probe prompts: "
          f"{digit_score.summary(samples)}. The same scorer on true clips of this size reads "
          f"digit {truth['digit']:.2f}, colour {truth['color']:.2f}, direction {truth['direction']:.2f}; "
          f"chance is about 0.10, 0.12 and 0.25.")
  item = dict(task="t2v probe", prompt=f"{samples['clips']} prompts: digit i % 10, direction and colour in turn",
              output=str(sheet), sheet="", inputs=[], note=digit_score.summary(samples))
  return item, [note]
