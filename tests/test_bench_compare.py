"""`vidsim bench compare`: the PyTorch peer gets the shape of the bench's synthetic batch."""

import pathlib

import numpy as np
import pytest

from vidsim import config as config_lib
from vidsim.bench import peer_arguments, synthetic_packed_batch
from vidsim.errors import UsageError

EXPERIMENTS = pathlib.Path(__file__).parent.parent / "experiments"


def arguments(name, **train):
  c = config_lib.load_config(str(EXPERIMENTS / name))
  with c.unlocked():
    c.train.update(train)
  args = peer_arguments(c)
  return dict(zip(args[::2], args[1::2]))


def test_the_peer_runs_each_segment_of_the_bench_rows_as_a_sample():
  # Two segments a row: 2 rows of 1,024 tokens are the peer's 4 samples of 512.
  assert arguments("dit_bench.py") == {
      "--samples": "4", "--tokens": "512", "--width": "512", "--depth": "8", "--heads": "4", "--caption": "64",
      "--patch-features": "16", "--text-width": "128", "--text-depth": "2"}
  # The demo's table row (docs/benchmarks.md): its DiT on the first-fit rows it trained on before.
  demo = arguments("digits_demo.py", row_tokens=256, rows_per_batch=8)
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


def test_the_synthetic_batch_of_a_precomputed_text_model_carries_embeddings():
  # The pod configs read an offline encoder's embeddings: the bench batch must hold them.
  c = config_lib.load_config(str(EXPERIMENTS / "pod_dit_1b_256p.py"), ["--config.train.row_tokens=256"])
  batch = synthetic_packed_batch(c, rows=1)
  k, s, e = c.train.max_segments_per_row, c.text.max_length, c.text.embed_dim
  assert "text_tokens" not in batch and batch["text_embeddings"].shape == (1, k, s, e)
  assert not batch["text_embeddings"][~batch["text_mask"]].any()  # Zero past each caption, as cached.
  assert batch["text_embeddings"][batch["text_mask"]].std() > 0.5


def test_mfu_of_peak_knows_the_published_chips_only():
  from vidsim.train.metrics import published_peak_flops_per_s
  assert published_peak_flops_per_s("NVIDIA H200") == 989e12
  assert published_peak_flops_per_s("TPU v5p") == 459e12
  assert published_peak_flops_per_s("NVIDIA H100 PCIe") is None  # Another part, another peak.
  assert published_peak_flops_per_s("cpu") is None
