"""`vidsim bench data`: clips/s and seconds per batch of read+decode+crop with 0, 1, 2 workers."""

import time

from vidsim import config as config_lib
from vidsim.data import pipeline, prepare
from vidsim.log import get_logger

log = get_logger("bench")
WORKER_COUNTS = (0, 1, 2)


def bench_data(config, worker_counts=WORKER_COUNTS) -> dict:
  """Times `pixel_dataset` on the train split (building the dataset first if needed).

  Per worker count: `bench.warmup` untimed batches (worker start-up, first reads), then
  `bench.steps` timed ones. Returns {"dataset", "buckets", "runs": [{workers, batches,
  clips, seconds, seconds_per_batch, clips_per_s, pixels_per_s}]}.
  """
  builder = prepare(config)
  runs = []
  for workers in worker_counts:
    variant = config_lib.from_json(config_lib.to_json(config))
    with variant.unlocked():
      variant.data.worker_count = int(workers)
    iterator = iter(pipeline.pixel_dataset(variant, variant.data.train_split, process_index=0, process_count=1))
    for _ in range(config.bench.warmup):
      next(iterator)
    clips = pixels = 0
    start = time.perf_counter()
    for _ in range(config.bench.steps):
      batch = next(iterator)
      clips += batch["video"].shape[0]
      pixels += batch["video"][..., 0].size
    seconds = time.perf_counter() - start
    runs.append(dict(workers=int(workers), batches=config.bench.steps, clips=clips, seconds=round(seconds, 4),
                     seconds_per_batch=round(seconds / config.bench.steps, 5),
                     clips_per_s=round(clips / seconds, 1), pixels_per_s=round(pixels / seconds)))
    log.info("data workers=%d: %.1f clips/s, %.4f s/batch", workers, runs[-1]["clips_per_s"],
             runs[-1]["seconds_per_batch"])
    del iterator  # Stops the worker processes before the next run.
  return dict(dataset=f"{builder.name}/{builder.builder_config.name}", batch_size=config.data.batch_size,
              buckets=[list(b) for b in config.data.buckets], runs=runs)
