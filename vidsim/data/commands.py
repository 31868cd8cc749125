"""`vidsim data prepare|inspect`: build the datasets a config names, and look at them."""

import collections
import os
import textwrap
import time

import numpy as np
from PIL import Image, ImageDraw

from vidsim import data as data_lib
from vidsim.data import pipeline
from vidsim.data.video_io import write_png
from vidsim.errors import UsageError
from vidsim.log import get_logger

log = get_logger("data")
SHEET_EXAMPLES = 8  # Rows of the contact sheet.
SHEET_FRAMES = 6  # Frames per row.
SHEET_HEIGHT = 64  # Pixel height of a frame on the sheet.


def run_data(args, config):
  if args.action == "prepare":
    prepare(config)
  elif args.action == "inspect":
    inspect(config, split=args.split or config.data.train_split, out=args.out)
  else:
    raise UsageError(f"unknown data action {args.action!r}; valid: prepare, inspect")


def prepare(config):
  """Builds (or reuses) the datasets (every preset for data.builder_config=all) and
  caches each split's shape index."""
  for preset in data_lib.prepare_presets(config):
    start = time.time()
    reused = data_lib.builder_for(config, preset).is_prepared()
    builder = data_lib.prepare(config, preset)
    for split in builder.info.splits.keys():
      source = builder.as_data_source(split)
      pipeline.shape_index(source, os.path.join(builder.data_dir, f"vidsim-shapes-{split}.npy"))
    counts = ", ".join(f"{s} {i.num_examples}" for s, i in builder.info.splits.items())
    verb = "reused" if reused else f"built in {time.time() - start:.1f}s"
    print(f"{builder.name}/{builder.builder_config.name}: {counts} ({verb})\n  {builder.data_dir}")
    report = builder.build_report_text()
    if report:
      print(textwrap.indent(report, "  "))


def inspect(config, split: str, out: str = ""):
  """Prints counts, the (frames, height, width) histogram, fps and bucket use; writes a sheet."""
  source = pipeline.data_source(config, split, build=False)  # Looking must not build.
  builder = data_lib.builder_for(config)
  shapes = pipeline.split_shape_index(config, split, source)
  fps = collections.Counter()
  for start in range(0, len(source), 256):
    for record in source.__getitems__(range(start, min(start + 256, len(source)))):
      fps[round(float(record["fps"]), 2)] += 1
  buckets = pipeline.check_buckets(config.data.buckets)
  by_shape = collections.Counter(tuple(int(v) for v in s) for s in shapes)
  by_bucket = collections.Counter(pipeline.assign_bucket(*s, buckets) for s in by_shape.elements())
  print(f"{builder.name}/{builder.builder_config.name} split {split}: {len(source)} clips, "
        f"{int(shapes[:, 0].sum())} frames, {int((shapes[:, 0] == 1).sum())} images")
  print("(frames, height, width): clips")
  for shape, n in sorted(by_shape.items()):
    print(f"  {shape}: {n}")
  print("fps: " + ", ".join(f"{f:g}: {n}" for f, n in sorted(fps.items())))
  print("buckets (config.data.buckets): clips")
  for i, bucket in enumerate(buckets):
    print(f"  {bucket}: {by_bucket.get(i, 0)}")
  if out:
    count = min(SHEET_EXAMPLES, len(source))
    examples = [pipeline.decode_example(source[i]) for i in range(count)]
    sheet = captioned_sheet(examples)
    write_png(out, sheet)
    print(f"contact sheet of {count} clips: {out}")


def captioned_sheet(examples) -> np.ndarray:
  """One row per example: evenly spaced frames at a common height, the caption below.
  (Clips of a dataset differ in size and carry captions; generated samples share one
  size and mark their given frames instead: video_io.contact_sheet.)"""
  rows = []
  for example in examples:
    video = example["video"]
    picks = np.unique(np.linspace(0, len(video) - 1, min(SHEET_FRAMES, len(video))).round().astype(int))
    width = max(1, round(video.shape[2] * SHEET_HEIGHT / video.shape[1]))
    frames = [Image.fromarray(video[t]).resize((width, SHEET_HEIGHT), Image.NEAREST) for t in picks]
    strip = Image.new("RGB", (len(frames) * (width + 2), SHEET_HEIGHT), (40, 40, 40))
    for i, frame in enumerate(frames):
      strip.paste(frame, (i * (width + 2), 0))
    label = f"{video.shape[0]}x{video.shape[1]}x{video.shape[2]} @{example['fps']:g}fps: {example['caption']}"
    rows.append((strip, textwrap.wrap(label, 70) or [""]))
  line_height = 12
  sheet_width = max(640, max(strip.width for strip, _ in rows) + 8)
  sheet_height = sum(SHEET_HEIGHT + len(lines) * line_height + 12 for _, lines in rows) + 4
  sheet = Image.new("RGB", (sheet_width, sheet_height), (0, 0, 0))
  draw = ImageDraw.Draw(sheet)
  y = 4
  for strip, lines in rows:
    sheet.paste(strip, (4, y))
    y += SHEET_HEIGHT + 2
    for line in lines:
      draw.text((4, y), line, fill=(230, 230, 230))
      y += line_height
    y += 10
  return np.asarray(sheet)
