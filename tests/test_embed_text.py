"""A frozen T5 end to end on the tiny config: train-vae -> encode -> embed-text -> train with
text.encoder=precomputed -> sample a new prompt; resume, and refusals of another encoder."""

import json
import os
import pathlib

import numpy as np
import pytest

from vidsim import cli
from vidsim import config as config_lib
from vidsim import latents as latents_lib
from vidsim import mesh as mesh_lib
from vidsim import text_cache
from vidsim.models import t5_loader
from vidsim.train.metrics import read_metrics

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = str(REPO / "experiments" / "digits_tiny.py")
T5 = REPO / "tests" / "data" / "t5"
TEXT = [f"--config.text.encoder=precomputed", f"--config.text.t5_path={T5 / 'umt5'}", "--config.text.max_length=24",
        "--config.text.embed_batch_size=8", "--config.encode.examples_per_shard=16", "--config.train.steps=2"]


def _config(*overrides):
  return config_lib.load_config(TINY, TEXT + list(overrides))


def _run(command, workdir, *overrides):
  return cli.main([command, "--config", TINY, "--workdir", str(workdir), *TEXT, *overrides])


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
  """A workdir with a 2-step VAE, its latent cache and the UMT5 caption embeddings."""
  from vidsim.data import commands
  from vidsim.train.vae_loop import train_vae

  root = tmp_path_factory.mktemp("embed_text")
  os.environ["VIDSIM_DATA_DIR"] = str(root / "data")
  config = _config("--config.vae_train.steps=2", "--config.vae_train.final_eval=false")
  commands.prepare(config)
  train_vae(config, root / "work", mesh_lib.make_mesh(config))
  assert _run("encode", root / "work") == 0
  assert _run("embed-text", root / "work") == 0
  return root / "work"


def test_every_caption_is_embedded_beside_its_latent(embedded):
  config = _config()
  manifest = text_cache.load_manifest(embedded, config)
  latent_manifest = latents_lib.load_manifest(embedded)
  encoder = t5_loader.load_text_encoder(config, mesh_lib.make_mesh(config))
  assert manifest["encoder"] == encoder.describe() and manifest["encoder"]["embed_dim"] == 32
  for split in ("train", "validation"):
    assert manifest["splits"][split]["num_examples"] == latent_manifest["splits"][split]["num_examples"]
  source = text_cache.TextSource(embedded, "train", manifest, latent_manifest)
  latents = latents_lib.cache_source(embedded, "train", latent_manifest)
  picked = [0, 17, 63]
  texts = source(picked)
  captions = [str(latents_lib.read_record(latents[i])["caption"]) for i in picked]
  expected, mask = encoder.embed(captions)
  for i, text, want, want_mask in zip(picked, texts, expected, mask):
    assert text["index"] == int(latents_lib.read_record(latents[i])["index"])
    np.testing.assert_array_equal(text["text_mask"], want_mask)
    np.testing.assert_allclose(text["text_embeddings"], want, atol=1e-5)


def test_embed_text_resumes_and_refuses_another_encoder(embedded, capsys, caplog):
  root = text_cache.text_dir(embedded)
  shard = sorted(root.glob("train-*.array_record"))[1]
  before = shard.read_bytes()
  shard.unlink()
  (root / "manifest.json").unlink()
  with caplog.at_level("INFO", logger="vidsim.embed-text"):
    assert _run("embed-text", embedded) == 0
  assert "1 shards to embed, 3 already done" in caplog.text
  assert shard.read_bytes() == before
  assert _run("embed-text", embedded, f"--config.text.t5_path={T5 / 't5'}") == 2
  err = capsys.readouterr().err
  assert f"holds caption embeddings of the umt5 encoder" in err and "Delete" in err


def test_train_and_sample_from_precomputed_embeddings(embedded, tmp_path, capsys):
  assert _run("train", embedded) == 0
  rows = read_metrics(embedded / "dit" / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2] and np.isfinite(rows[-1]["loss"])
  saved = json.loads((embedded / "config.json").read_text())
  assert saved["text"]["embed_dim"] == 32  # Read from the cache.
  out = tmp_path / "new_prompt.gif"
  assert _run("sample", embedded, "--prompt", "a cyan 4 slowly rises", "--out", str(out), "--steps", "2") == 0
  assert out.exists() and out.stat().st_size > 0
  # Training again with another encoder's directory is refused: prompts would be embedded differently.
  capsys.readouterr()
  assert _run("train", embedded, f"--config.text.t5_path={T5 / 't5'}", "--config.train.steps=3") == 2
  assert "were made by the umt5 encoder" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_two_processes_embed_the_same_cache_as_one(embedded, tmp_path):
  """embed-text as 2 jax processes x 4 devices (the encoder's params span both, every
  call a collective; each process writes its own shards) gives the one-process cache."""
  import shutil

  from test_multiprocess import run_processes

  work = tmp_path / "work"
  shutil.copytree(embedded, work, ignore=shutil.ignore_patterns("dit"))
  shutil.rmtree(text_cache.text_dir(work))
  results = run_processes(["embed-text", "--config", TINY, "--workdir", str(work), *TEXT], 2, 4,
                          {"VIDSIM_DATA_DIR": os.environ["VIDSIM_DATA_DIR"]})
  for code, _, err in results:
    assert code == 0, err[-3000:]
  assert "shards to embed" in results[1][2]  # Process 1 took part.
  config = _config()
  one, two = (text_cache.load_manifest(w, config) for w in (embedded, work))
  assert two == one
  latent_manifest = latents_lib.load_manifest(embedded)
  for split, entry in one["splits"].items():
    everything = list(range(entry["num_examples"]))
    ours = text_cache.TextSource(work, split, two, latent_manifest)(everything)
    reference = text_cache.TextSource(embedded, split, one, latent_manifest)(everything)
    for a, b in zip(ours, reference):
      assert a["index"] == b["index"]
      np.testing.assert_array_equal(a["text_mask"], b["text_mask"])
      # 2 x 4 devices reduce in another order than 1 x 8: ~1e-5 apart.
      np.testing.assert_allclose(a["text_embeddings"], b["text_embeddings"], rtol=1e-4, atol=1e-4)
