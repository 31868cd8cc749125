"""The grain pixel pipeline: buckets, determinism, resume through Orbax, process shards."""

import numpy as np
import pytest

from vidsim import config as config_lib
from vidsim.data import pipeline, prepare

BUCKETS = ((5, 16, 16), (5, 16, 24), (5, 24, 16), (1, 16, 16))


OVERRIDES = (
    "--config.data.builder_config=mixed",
    f"--config.data.buckets={BUCKETS}",
    "--config.data.batch_size=4",
    "--config.data.max_batch_multiplier=2",
    "--config.moving_digits.train_examples=40",
    "--config.moving_digits.eval_examples=8",
)


@pytest.fixture(scope="module")
def repo_root_module():
  import pathlib

  return pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mixed_config(tmp_path_factory, repo_root_module):
  data_dir = tmp_path_factory.mktemp("datasets")
  config = config_lib.load_config(str(repo_root_module / "experiments" / "digits_tiny.py"),
                                  OVERRIDES + (f"--config.data.data_dir={data_dir}",))
  prepare(config)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_extreme_aspect_ratios_land_in_sensible_buckets():
  buckets = ((9, 32, 32), (9, 24, 40), (9, 40, 24), (1, 32, 32), (1, 24, 40), (1, 40, 24))
  assert buckets[pipeline.assign_bucket(33, 540, 1290, buckets)] == (9, 24, 40)  # 2.39:1 cinema.
  assert buckets[pipeline.assign_bucket(33, 1920, 1080, buckets)] == (9, 40, 24)  # 9:16 phone.
  assert buckets[pipeline.assign_bucket(1, 1080, 1920, buckets)] == (1, 24, 40)  # A wide image.
  assert buckets[pipeline.assign_bucket(9, 32, 32, buckets)] == (9, 32, 32)
  # A video shorter than every video bucket still goes to a video bucket (padded in time).
  assert buckets[pipeline.assign_bucket(3, 32, 32, buckets)][0] == 9


def test_fit_to_bucket_keeps_aspect_and_is_deterministic_without_rng():
  rng = np.random.default_rng(0)
  video = rng.integers(0, 255, (12, 54, 129, 3), dtype=np.uint8)  # 2.39:1.
  out = pipeline.fit_to_bucket(video, (9, 24, 40))
  assert out.shape == (9, 24, 40, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, pipeline.fit_to_bucket(video, (9, 24, 40)))
  # Aspect kept: the 129 columns scale by the same factor as the 54 rows (24/54), then crop.
  full = pipeline.fit_to_bucket(video[:, :, :, :], (9, 24, round(129 * 24 / 54)))
  np.testing.assert_array_equal(out, full[:, :, (full.shape[2] - 40) // 2 :][:, :, :40])
  random_a = pipeline.fit_to_bucket(video, (9, 24, 40), np.random.default_rng(1))
  random_b = pipeline.fit_to_bucket(video, (9, 24, 40), np.random.default_rng(1))
  np.testing.assert_array_equal(random_a, random_b)
  short = pipeline.fit_to_bucket(video[:2], (5, 24, 40))
  np.testing.assert_array_equal(short[2:], np.repeat(short[1:2], 3, axis=0))  # Padded with the last frame.


def test_batch_sizes_keep_pixels_roughly_constant_and_divide_evenly():
  sizes = pipeline.bucket_batch_sizes(((9, 32, 32), (9, 16, 16), (1, 32, 32)), 8, 4, multiple=4)
  assert sizes == [8, 32, 32]  # 4x fewer pixels -> 4x the clips; images capped at 4x.
  assert all(s % 4 == 0 for s in pipeline.bucket_batch_sizes(((9, 32, 32),), 6, 8, multiple=4))


def test_batches_are_deterministic_and_images_pass_through(mixed_config):
  a = _take(iter(pipeline.pixel_dataset(mixed_config, "train", batch_multiple=2)), 8)
  b = _take(iter(pipeline.pixel_dataset(mixed_config, "train", batch_multiple=2)), 8)
  _assert_same(a, b)
  shapes = set()
  for batch in a:
    video = batch["video"]
    assert video.dtype == np.float32 and video.min() >= -1 and video.max() <= 1
    t, h, w = video.shape[1:4]
    assert (t, h, w) == BUCKETS[int(batch["bucket"][0])] and np.all(batch["bucket"] == batch["bucket"][0])
    assert len(batch["caption"]) == len(video) == len(batch["example_id"]) == len(batch["fps"])
    assert video.shape[0] % 2 == 0
    shapes.add(t)
  assert 1 in shapes and 5 in shapes  # Images and videos mix in one stream.
  other_seed = _take(iter(pipeline.pixel_dataset(mixed_config, "train", seed=123)), 2)
  assert not np.array_equal(other_seed[0]["example_id"], a[0]["example_id"])


def test_resume_from_orbax_checkpoint_gives_identical_batches(mixed_config, tmp_path):
  import grain
  import orbax.checkpoint as ocp

  iterator = iter(pipeline.pixel_dataset(mixed_config, "train"))
  _take(iterator, 5)
  checkpointer = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  checkpointer.save(tmp_path / "iter", args=grain.checkpoint.CheckpointSave(iterator))
  expected = _take(iterator, 6)

  fresh = iter(pipeline.pixel_dataset(mixed_config, "train"))
  checkpointer.restore(tmp_path / "iter", args=grain.checkpoint.CheckpointRestore(fresh))
  _assert_same(expected, _take(fresh, 6))


_RESTORE_IN_NEW_PROCESS = """
import sys, grain, numpy as np, orbax.checkpoint as ocp
from vidsim import config as config_lib
from vidsim.data import pipeline
config = config_lib.load_config(sys.argv[1], sys.argv[4:])
iterator = iter(pipeline.pixel_dataset(config, "train"))
ocp.Checkpointer(grain.checkpoint.CheckpointHandler()).restore(
    sys.argv[2], args=grain.checkpoint.CheckpointRestore(iterator))
batches = [next(iterator) for _ in range(3)]
np.savez(sys.argv[3], **{f"{k}{i}": b[k] for i, b in enumerate(batches) for k in ("video", "example_id", "bucket")})
"""


def test_resume_in_a_new_process_gives_identical_batches(mixed_config, repo_root_module, tmp_path):
  import subprocess
  import sys

  import grain
  import orbax.checkpoint as ocp

  iterator = iter(pipeline.pixel_dataset(mixed_config, "train"))
  _take(iterator, 4)
  ocp.Checkpointer(grain.checkpoint.CheckpointHandler()).save(
      tmp_path / "iter", args=grain.checkpoint.CheckpointSave(iterator))
  expected = _take(iterator, 3)
  out = tmp_path / "next.npz"
  args = [sys.executable, "-c", _RESTORE_IN_NEW_PROCESS, str(repo_root_module / "experiments" / "digits_tiny.py"),
          str(tmp_path / "iter"), str(out), *OVERRIDES, f"--config.data.data_dir={mixed_config.data.data_dir}"]
  subprocess.run(args, check=True, cwd=repo_root_module, timeout=120)
  restored = np.load(out)
  for i, batch in enumerate(expected):
    for key in ("video", "example_id", "bucket"):
      np.testing.assert_array_equal(restored[f"{key}{i}"], batch[key])


def test_two_processes_get_disjoint_rows_that_cover_the_epoch(mixed_config):
  streams = [iter(pipeline.pixel_dataset(mixed_config, "train", process_index=p, process_count=2))
             for p in range(2)]
  seen = set()
  num_examples = mixed_config.moving_digits.train_examples
  for _ in range(40):
    first, second = next(streams[0]), next(streams[1])
    assert first["video"].shape == second["video"].shape  # Same bucket at the same step.
    assert not set(first["example_id"]) & set(second["example_id"])
    seen |= set(first["example_id"].tolist()) | set(second["example_id"].tolist())
    if len(seen) == num_examples:
      break
  assert seen == set(range(num_examples))


def test_one_worker_process_gives_the_same_batches_and_resumes(mixed_config):
  with mixed_config.unlocked():
    mixed_config.data.worker_count = 1
  try:
    iterator = iter(pipeline.pixel_dataset(mixed_config, "train"))
    with_worker = _take(iterator, 3)
    state = iterator.get_state()
    expected = _take(iterator, 2)
    resumed = iter(pipeline.pixel_dataset(mixed_config, "train"))
    resumed.set_state(state)
    _assert_same(expected, _take(resumed, 2))
  finally:
    with mixed_config.unlocked():
      mixed_config.data.worker_count = 0
  _assert_same(_take(iter(pipeline.pixel_dataset(mixed_config, "train")), 3), with_worker)


def test_decode_example_and_data_source(mixed_config):
  source = pipeline.data_source(mixed_config, "validation")
  assert len(source) == 8
  example = pipeline.decode_example(source[0], mixed_config)
  video = example["video"]
  assert video.dtype == np.uint8 and video.shape == (example["num_frames"], example["height"], example["width"], 3)
  assert example["caption"] and example["metadata"]["digits"]
  window = pipeline.decode_example(source[0], frame_range=(0, 1))["video"]
  np.testing.assert_array_equal(window, video[:1])

