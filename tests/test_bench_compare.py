"""`vidsim bench compare`: the PyTorch peer gets the shape of the bench's synthetic batch."""

import pathlib

import numpy as np
import pytest

from vidsim import config as config_lib
from vidsim.bench import peer_arguments, synthetic_packed_batch
from vidsim.errors import UsageError

EXPERIMENTS = pathlib.Path(__file__).parent.parent / "experiments"


def arguments(name):
  args = peer_arguments(config_lib.load_config(str(EXPERIMENTS / name)))
  return dict(zip(args[::2], args[1::2]))


def test_the_peer_runs_each_segment_of_the_bench_rows_as_a_sample():
  # Two segments a row: 2 rows of 1,024 tokens are the peer's 4 samples of 512.
  assert arguments("dit_bench.py") == {
      "--samples": "4", "--tokens": "512", "--width": "512", "--depth": "8", "--heads": "4", "--caption": "64",
      "--patch-features": "16", "--text-width": "128", "--text-depth": "2"}
  demo = arguments("digits_demo.py")
  assert demo == {**demo, "--samples": "16", "--tokens": "128", "--width": "128", "--depth": "4",
                  "--text-width": "64", "--text-depth": "1", "--patch-features": "32"}
  quality = arguments("digits_quality.py")
  assert quality == {**quality, "--samples": "24", "--tokens": "128", "--width": "256", "--depth": "6",
                     "--text-width": "128", "--text-depth": "2", "--patch-features": "32"}


def test_a_model_the_peer_cannot_build_is_refused():
  c = config_lib.load_config(str(EXPERIMENTS / "dit_bench.py"))
  with c.unlocked():
    c.dit.mlp = "gelu"
  with pytest.raises(UsageError, match="dit.mlp"):
    peer_arguments(c)


def test_the_synthetic_batch_has_one_caption_per_segment():
  c = config_lib.load_config(str(EXPERIMENTS / "dit_bench.py"))
  batch = synthetic_packed_batch(c)
  assert batch["segment_ids"].shape == (2, 1024) and set(np.unique(batch["segment_ids"])) == {1, 2}
  assert batch["text_mask"][:, :2].sum(-1).tolist() == [[39, 39]] * 2  # The peer: 40 valid bytes.
  assert not batch["text_mask"][:, 2:].any()  # Slots without a segment are empty.
  positions = batch["positions"][0, :512]
  assert positions.max(0).tolist() == [3, 15, 7]  # 4 frames x 16 x 8, the peer's grid.
