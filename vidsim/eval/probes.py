"""Probes of generated video on the embedded world: what a model makes, scored by reading its frames.

`score_probe` makes text-to-video for one-digit probe prompts and reads digit, colour
and direction back with vidsim/digit_score.py (the training hook's quick score).

`run_probes` is `vidsim eval --what probes` (and train.probe_every): every world probe
(PROBES), each with its score, its ceiling (the same criteria on true clips of the
validation split: vidsim/eval/cases.py), its chance level and n. The criteria are in
vidsim/eval/criteria.py and read only frames, so any model's output of this world can
be scored the same way.
"""

import numpy as np

from vidsim import config as config_lib
from vidsim import data as data_lib
from vidsim import digit_score
from vidsim import tasks as tasks_lib
from vidsim.errors import UsageError
from vidsim.eval import cases, criteria
from vidsim.sample.engine import generate


def score_probe(config, engine, count: int) -> dict:
  """t2v for `count` one-digit probe prompts (digit_score.probe_prompts) at the sample
  size, scored against their prompts; the result also holds the videos and prompts."""
  s = config.sample
  prompts = digit_score.probe_prompts(count, config.moving_digits.colors)
  generation = generate(engine, "t2v", prompts, frames=s.frames, height=s.height, width=s.width,
                        seed=config.seed + 1, steps=s.steps, sampler=s.sampler, guidance=s.guidance)
  result = digit_score.score(generation.videos, prompts, config.moving_digits.digit_size)
  return dict(result, videos=generation.videos, prompts=prompts)


# ------------------------------------------------------------------ the world probes (`vidsim eval --what probes`)

# In the order they are run and reported. Each but t2v and identity generates with one task.
PROBES = ("t2v", "identity", "permanence", "offscreen", "i2v", "extend-forward", "extend-backward", "loop",
          "connect", "edit", "long-extension")
TASK = {"permanence": "t2v", "i2v": "i2v", "extend-forward": "extend-forward", "extend-backward": "extend-backward",
        "loop": "loop", "connect": "connect", "edit": "edit", "long-extension": "extend-forward"}
ABOUT = {
    "t2v": "text to video: the prompt's digit, colour and direction (vidsim/digit_score.py)",
    "identity": "how often the digit read in one clear frame is the one read in the next (1 = never changes), "
                "over the t2v clips",
    "permanence": "occlusion scenes: the digit that comes out from behind the grey bar is the one that went in, "
                  "in its colour, where its motion says",
    "offscreen": "a digit that leaves the frame and comes back",
    "i2v": "image to video: the given frame's digit and colour persist",
    "extend-forward": "digit, colour and direction continue across the window boundary",
    "extend-backward": "digit, colour and direction continue across the window boundary (backwards in time)",
    "loop": "the jump from the last frame to the first is no larger than a typical frame-to-frame step",
    "connect": "starts as the first clip's end and arrives at the second's start",
    "edit": "SDEdit with a recoloured prompt: the new colour appears, the digit and the motion stay",
    "long-extension": "a clip extended to >= 4x its length: identity and motion per window (a drift curve)",
}


def skipped_probes(config) -> dict:
  """{probe: why it does not apply} for this config (every probe off the moving_digits world)."""
  if not data_lib.dataset_spec(config).world_truth:
    reason = (f"data.builder={config.data.builder!r} has no world truth: the probes read digits, colours and "
              "motion of the moving_digits world")
    return {name: reason for name in PROBES}
  if config.sample.frames == 1:
    return {name: "sample.frames is 1: the probes score motion over frames" for name in PROBES}
  skipped = {"offscreen": "the moving_digits world bounces digits off the frame edges (moving_digits._bounce): "
                          "no scene shows a digit leaving the frame and coming back"}
  if config.moving_digits.occluder_width < config.moving_digits.digit_size:
    skipped["permanence"] = (f"moving_digits.occluder_width={config.moving_digits.occluder_width} is narrower "
                             f"than a digit ({config.moving_digits.digit_size}): no digit is ever fully hidden")
  return skipped


def score_case(config, probe: str, case, video) -> dict:
  """The row of one output (generated or real) of a probe's case (vidsim/eval/criteria.py)."""
  size, info = config.moving_digits.digit_size, case.info
  if probe == "permanence":
    return criteria.permanence(video, size)
  if probe == "i2v":
    return criteria.image_to_video(info["image"], video, size)
  if probe in ("extend-forward", "extend-backward"):
    return criteria.extension(info["source"], video, size, forward=probe == "extend-forward")
  if probe == "loop":
    return criteria.loop(video, size)
  if probe == "connect":
    return criteria.connect(info["first"], info["second"], video, size, info["given_frames"])
  if probe == "edit":
    return criteria.edit(info["source"], video, info["new_color"], size)
  if probe == "long-extension":
    return criteria.long_extension(info["source"], video, size)
  raise ValueError(f"no criterion for probe {probe!r}")


def _fraction(rows, key="passed"):
  return round(float(np.mean([bool(r.get(key)) for r in rows])), 4) if rows else None


def _chance_outputs(probe: str, cases_):
  """Realistic clips that do not answer the cases: the next case's true output; for a
  loop, the plain clip (not played back); for permanence, the first half of the clip
  and the second half of the next one (a random digit comes out)."""
  if probe == "loop":
    return [c.info["plain"] for c in cases_]
  following = cases_[1:] + cases_[:1]
  if probe == "permanence":
    half = len(cases_[0].real) // 2
    return [np.concatenate([c.real[:half], d.real[half:]]) for c, d in zip(cases_, following)]
  return [d.real for d in following]


_REFERENCE = {}


def reference(config, probe: str, count: int) -> dict:
  """A probe's rows on `count` true clips (its ceiling) and on realistic clips that do
  not answer the inputs (its measured chance). Cached per config and count."""
  key = (config_lib.to_json(config), probe, count)
  if key not in _REFERENCE:
    cases_ = [cases.make_case(config, probe, i) for i in range(count)]
    _REFERENCE[key] = dict(
        ceiling=[score_case(config, probe, c, c.real) for c in cases_],
        chance=[score_case(config, probe, c, v) for c, v in zip(cases_, _chance_outputs(probe, cases_))])
  return _REFERENCE[key]


def _entry(rows, ceiling_rows, chance_rows, criteria_keys, protocol) -> dict:
  return dict(
      score=_fraction(rows), ceiling=_fraction(ceiling_rows), chance=_fraction(chance_rows), n=len(rows),
      criteria={k: dict(score=_fraction(rows, k), ceiling=_fraction(ceiling_rows, k)) for k in criteria_keys},
      protocol=protocol, rows=rows)


def _generate(engine, config, task, cases_, seed):
  """The task's outputs for the cases: one batch when the task takes no input clips, else one call per case."""
  s = config.sample
  common = dict(steps=s.steps, sampler=s.sampler, guidance=s.guidance)
  if not tasks_lib.get(task).inputs:
    return list(generate(engine, task, [c.prompt for c in cases_], seed=seed, **cases_[0].inputs, **common).videos)
  return [generate(engine, task, [c.prompt], seed=seed + i, **c.inputs, **common).videos[0]
          for i, c in enumerate(cases_)]


def _t2v_shapes(config):
  """(frames, height, width) of every aspect ratio the model trained on for videos: the
  sample size, then the first wide and tall video buckets."""
  s = config.sample
  shapes = [(s.frames, s.height, s.width)]
  videos = [tuple(int(v) for v in b) for b in config.data.buckets if b[0] > 1]
  for pick in (lambda b: b[2] > b[1], lambda b: b[1] > b[2]):
    shape = next((b for b in videos if pick(b)), None)
    if shape is not None and shape not in shapes:
      shapes.append(shape)
  return shapes


def run_probes(config, engine, count: int, ceiling_count: int, *, step=None, seed=None) -> dict:
  """Every probe that applies: `count` generated clips each (t2v: per aspect ratio),
  scored with the criteria of vidsim/eval/criteria.py, next to the same probe on
  `ceiling_count` true clips (ceiling) and its chance level. The JSON of W/eval/probes.json."""
  s, md = config.sample, config.moving_digits
  seed = config.seed + 1 if seed is None else seed
  skipped = skipped_probes(config)
  protocol = dict(split=config.data.eval_split, count=count, ceiling_count=ceiling_count, seed=seed,
                  sampler=s.sampler, steps=s.steps, guidance=s.guidance, dit_step=step)
  out = {}
  t2v_videos, t2v_truth = [], []
  if "t2v" not in skipped:
    colors = tuple(md.colors)
    chance = dict(digit=0.1, color=round(1 / len(colors), 4), direction=round(1 / len(digit_score.PROBE_DIRECTIONS), 4))
    for frames, height, width in _t2v_shapes(config):
      prompts = digit_score.probe_prompts(count, colors)
      try:
        videos = generate(engine, "t2v", prompts, frames=frames, height=height, width=width, seed=seed,
                          **dict(steps=s.steps, sampler=s.sampler, guidance=s.guidance)).videos
      except UsageError as e:
        out[f"t2v_{frames}x{height}x{width}"] = dict(skipped=str(e))
        continue
      truth = [cases.scene(config, "t2v", i, frames, height, width) for i in range(ceiling_count)]
      got = digit_score.score(videos, prompts, md.digit_size)
      ceiling = digit_score.score([v for v, _ in truth], [c for v, c in truth], md.digit_size)
      all_ok = lambda r: dict(r, passed=r["digit_ok"] and r["color_ok"] and r["direction_ok"])
      entry = _entry([all_ok(r) for r in got["rows"]], [all_ok(r) for r in ceiling["rows"]], [], [],
                     dict(protocol, frames=frames, height=height, width=width, prompts="digit_score.probe_prompts"))
      entry["chance"] = round(chance["digit"] * chance["color"] * chance["direction"], 5)
      entry["criteria"] = {k: dict(score=got[k], ceiling=ceiling[k], chance=chance[k]) for k in chance}
      out[f"t2v_{frames}x{height}x{width}"] = entry
      t2v_videos.extend(videos)
      t2v_truth.extend(v for v, _ in truth)
  if "identity" not in skipped and t2v_videos:
    stability = lambda videos: _stability([criteria.identity_changes(v, md.digit_size) for v in videos])
    got, ceiling = stability(t2v_videos), stability(t2v_truth)
    out["identity"] = dict(score=got[0], ceiling=ceiling[0], chance=0.1, n=len(t2v_videos),
                           protocol=dict(protocol, clear_frame_pairs=got[1], ceiling_clear_frame_pairs=ceiling[1],
                                         clips="the t2v clips of every aspect ratio"))
  for probe in PROBES[2:]:
    if probe in skipped:
      continue
    try:
      cases_ = [cases.make_case(config, probe, i) for i in range(count)]
      videos = _generate(engine, config, TASK[probe], cases_, seed)
    except UsageError as e:
      out[probe] = dict(skipped=str(e))
      continue
    rows = [score_case(config, probe, c, v) for c, v in zip(cases_, videos)]
    ref = reference(config, probe, ceiling_count)
    keys = [k for k, v in ref["ceiling"][0].items() if isinstance(v, bool) and k != "passed"]
    first = cases_[0].inputs
    entry = _entry(rows, ref["ceiling"], ref["chance"], keys,
                   dict(protocol, task=TASK[probe], frames=first["frames"], height=first["height"], width=first["width"],
                        **_tolerances(config, probe)))
    if probe == "long-extension":
      entry["curve"] = {k: dict(score=_per_window(rows, k), ceiling=_per_window(ref["ceiling"], k))
                        for k in ("identity", "motion")}
    out[probe] = entry
  for probe, reason in skipped.items():
    out[probe] = dict(skipped=reason)
  return dict(protocol=protocol, about={k: ABOUT[k] for k in PROBES},
              probes={k: out[k] for k in sorted(out, key=lambda k: PROBES.index(k.split("_")[0]))})


def _stability(changes_and_pairs):
  changes = sum(c for c, _ in changes_and_pairs)
  pairs = sum(p for _, p in changes_and_pairs)
  return (round(1.0 - changes / pairs, 4) if pairs else None), pairs


def _per_window(rows, key):
  """Per window: the share of judged clips that pass (None where no clip was judged)."""
  if not rows:
    return []
  columns = zip(*[r[key] for r in rows])
  return [round(float(np.mean([v for v in column if v is not None])), 4) if any(v is not None for v in column)
          else None for column in columns]


def _tolerances(config, probe) -> dict:
  size = config.moving_digits.digit_size
  if probe == "permanence":
    return dict(position_tolerance_px=criteria.permanence_tolerance(size))
  if probe in ("connect", "edit"):
    return dict(position_tolerance_px=criteria.position_tolerance(size))
  if probe == "loop":
    return dict(jump_tolerance="%.1f x the median frame-to-frame step + 1 px" % criteria.LOOP_JUMP_STEPS)
  if probe == "long-extension":
    return dict(speed_ratio=criteria.SPEED_RATIO, length_factor=4)
  return {}


def headline_metrics(result: dict) -> dict:
  """{probe_<name>: score, probe_<name>_ceiling: ceiling} of a run_probes result, for metrics.jsonl."""
  metrics = {}
  for name, entry in result["probes"].items():
    if entry.get("score") is not None:
      key = "probe_" + name.replace("-", "_")
      metrics[key] = entry["score"]
      if entry.get("ceiling") is not None:
        metrics[key + "_ceiling"] = entry["ceiling"]
  return metrics
