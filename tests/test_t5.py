"""The T5 / UMT5 encoder against transformers' outputs on tiny random models (tests/data/t5, made
by tools/make_t5_goldens.py), and the loader's refusals."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vidsim import cli
from vidsim import mesh as mesh_lib
from vidsim.errors import UsageError
from vidsim.models import t5 as t5_lib
from vidsim.models import t5_loader

DATA = t5_loader.epath.Path(__file__).resolve().parent / "data" / "t5"
MODELS = ("t5", "t5_relu", "umt5")
# float32 against transformers' float32 on CPU: observed max |difference| 1.8e-5 at hidden
# values up to 4 (summation order); a layout or bucket mistake is off by O(1).
ATOL, RTOL = 1e-4, 1e-4


def _golden(name):
  g = np.load(DATA / name / "golden.npz")
  return [str(c) for c in g["captions"]], g["ids"], g["mask"], g["hidden"]


@pytest.fixture(scope="module")
def mesh_config(tmp_path_factory):
  from vidsim import config as config_lib

  config = config_lib.load_config(str(DATA.parent.parent.parent / "experiments" / "digits_tiny.py"))
  with config.unlocked():
    config.mesh.ici.update(dict(data=2, fsdp=2, tensor=2))  # Params over fsdp and tensor, captions over data x fsdp.
  return config, mesh_lib.make_mesh(config)


@pytest.mark.parametrize("name", MODELS)
def test_tokenizer_matches_reference(name):
  captions, ids, mask, _ = _golden(name)
  ours, our_mask = t5_loader.Tokenizer(DATA / name)(captions, ids.shape[1])
  np.testing.assert_array_equal(ours, ids)
  np.testing.assert_array_equal(our_mask, mask)
  assert mask[3].all() and ours[3, -1] == 1  # The long caption is cut and keeps its </s>.


@pytest.mark.parametrize("name", MODELS)
def test_encoder_matches_reference_on_a_mesh(name, mesh_config):
  config, mesh = mesh_config
  captions, ids, mask, hidden = _golden(name)
  encoder = t5_loader.TextEncoder(DATA / name, mesh, config, max_length=ids.shape[1])
  assert encoder.kind == json.loads((DATA / name / "config.json").read_text())["model_type"]
  q = encoder.params["blocks"]["q"]
  assert q.shape[0] == t5_lib.read_config(DATA / name).num_layers and not q.sharding.is_fully_replicated
  embeddings, our_mask = encoder.embed(captions)
  np.testing.assert_array_equal(our_mask, mask)
  np.testing.assert_allclose(embeddings[mask], hidden[mask], atol=ATOL, rtol=RTOL)
  assert not embeddings[~mask].any()  # Padding positions are zeros.


def test_bfloat16_encoder_is_close(mesh_config):
  config, mesh = mesh_config
  captions, ids, mask, hidden = _golden("umt5")
  encoder = t5_loader.TextEncoder(DATA / "umt5", mesh, config, dtype="bfloat16", max_length=ids.shape[1])
  embeddings, _ = encoder.embed(captions)
  error = np.abs(embeddings[mask] - hidden[mask])
  # bfloat16 keeps 8 bits of mantissa; through 3 layers of these deliberately large random
  # weights (unscaled attention scores up to ~30) the mean error is ~5% of the mean value.
  assert error.mean() < 0.08 * np.abs(hidden[mask]).mean()
  assert np.corrcoef(embeddings[mask].ravel(), hidden[mask].ravel())[0, 1] > 0.99


def test_relative_position_buckets_are_symmetric_in_sign():
  buckets = t5_lib.relative_position_buckets(40, 32, 128)
  assert buckets[0, 0] == 0 and buckets[0, 1] == 17 and buckets[1, 0] == 1
  assert buckets[0, 39] == 16 + buckets[39, 0]  # Same magnitude, other half of the table.
  far = t5_lib.relative_position_buckets(400, 8, 12)
  assert far.max() == 7 and far[399, 0] == 3  # Beyond max_distance: the last bucket of each half.


def _copy(tmp_path, name="t5"):
  target = tmp_path / name
  shutil.copytree(DATA / name, target)
  return target


def test_missing_unexpected_and_wrong_shape_tensors_are_listed(tmp_path):
  directory = _copy(tmp_path)
  tensors = load_file(directory / "model.safetensors")
  del tensors["encoder.block.1.layer.0.SelfAttention.k.weight"]
  tensors["encoder.block.7.layer.0.SelfAttention.q.weight"] = np.zeros((32, 32), np.float32)
  tensors["encoder.final_layer_norm.weight"] = np.ones((31,), np.float32)
  save_file(tensors, directory / "model.safetensors")
  with pytest.raises(UsageError) as error:
    t5_loader.read_params(t5_lib.read_config(directory), t5_loader.weight_files(directory), directory)
  message = str(error.value)
  assert "missing 1: encoder.block.1.layer.0.SelfAttention.k.weight" in message
  assert "unexpected 1: encoder.block.7.layer.0.SelfAttention.q.weight" in message
  assert "wrong shape 1: encoder.final_layer_norm.weight: [31], expected [32]" in message


def test_seq2seq_checkpoint_loads_its_encoder(tmp_path):
  """A full encoder-decoder checkpoint: decoder and lm_head skipped, the embedding under its
  encoder name."""
  directory = _copy(tmp_path)
  tensors = load_file(directory / "model.safetensors")
  reference = t5_loader.read_params(t5_lib.read_config(DATA / "t5"), [DATA / "t5" / "model.safetensors"])
  tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
  tensors["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((32, 32), np.float32)
  tensors["lm_head.weight"] = np.zeros((300, 32), np.float32)
  save_file(tensors, directory / "model.safetensors")
  params = t5_loader.read_params(t5_lib.read_config(directory), t5_loader.weight_files(directory), directory)
  np.testing.assert_array_equal(params["embed"], reference["embed"])
  assert t5_loader.fingerprint(directory) == t5_loader.fingerprint(DATA / "t5")  # Decoder tensors do not name it.


def test_fingerprint_changes_with_the_weights(tmp_path):
  directory = _copy(tmp_path)
  tensors = load_file(directory / "model.safetensors")
  tensors["encoder.block.2.layer.1.DenseReluDense.wo.weight"] *= 1.01
  save_file(tensors, directory / "model.safetensors")
  assert t5_loader.fingerprint(directory) != t5_loader.fingerprint(DATA / "t5")


def test_directory_errors_say_what_it_must_hold(tmp_path):
  with pytest.raises(UsageError, match="is not a directory; it must hold config.json"):
    t5_loader.check_directory(tmp_path / "nowhere")
  directory = _copy(tmp_path)
  (directory / "spiece.model").unlink()
  with pytest.raises(UsageError, match="no tokenizer .*tokenizer.json or spiece.model"):
    t5_loader.check_directory(directory)
  (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
  with pytest.raises(UsageError, match="has no \\*.safetensors weights .*pytorch_model.bin"):
    t5_loader.check_directory(directory)


def test_embed_text_without_the_directory_exits_2(tmp_path, repo_root, capsys):
  code = cli.main(["embed-text", "--config", str(repo_root / "experiments" / "digits_tiny.py"),
                   "--workdir", str(tmp_path / "w"), "--config.text.encoder=precomputed",
                   f"--config.text.t5_path={tmp_path / 'no_such_model'}"])
  assert code == 2
  err = capsys.readouterr().err
  assert "no_such_model is not a directory" in err and "config.json" in err and "spiece.model" in err
