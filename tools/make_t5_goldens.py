"""Writes tiny random-weight T5 / UMT5 encoders in Hugging Face layout and the reference's outputs.

Run in a separate virtualenv with the reference implementation (the vidsim suite never needs it):

    python3 -m venv /tmp/hfenv
    /tmp/hfenv/bin/pip install torch==2.13.0 transformers sentencepiece protobuf safetensors
    /tmp/hfenv/bin/python tools/make_t5_goldens.py            # -> tests/data/t5/

It trains a SentencePiece model on local text (this repository's README and docs, plus captions
of the embedded world), then writes under tests/data/t5/:
  t5/       T5 v1.1 style (gated-GELU, relative bias in layer 0), spiece.model, one model.safetensors
  t5_relu/  original T5 style (ReLU feed-forward), spiece.model (identity normaliser)
  umt5/     UMT5 (per-layer relative bias), tokenizer.json only (identity normaliser), weights in shards with
            model.safetensors.index.json
and for each, golden.npz: the captions, the reference tokenizer's ids and mask (padded to
max_length, truncated) and transformers' encoder's last hidden states (float32).
tests/test_t5.py checks vidsim's tokenizer and encoder against them.
"""

import json
import pathlib
import shutil
import tempfile

import numpy as np
import sentencepiece
import torch
import transformers

REPO = pathlib.Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "data" / "t5"
MAX_LENGTH = 24
CAPTIONS = [
    "a red 3 moves right",
    "a blue 7 slowly falls while a green 1 moves up and to the left",
    "an orange 0 at the top left",
    "a yellow 5 starts near the bottom right corner and moves quickly to the left, passing behind the grey bar "
    "while a white 8 rises slowly from the centre",  # Longer than MAX_LENGTH tokens: truncated.
    "Zwei Würfel, 3 × schneller",  # Characters the tiny vocabulary does not know.
]
WORLD_TEXT = """a red 3 moves right
a blue 7 falls
a green 1 slowly rises while a cyan 4 moves left
a magenta 9 moves down and to the right and passes behind the grey bar
an orange 2 at the bottom centre and a white 6 on the left
a yellow 5 starts at the top left and moves quickly to the right
"""


def train_sentencepiece(directory: pathlib.Path, normalization: str) -> pathlib.Path:
  """A unigram model with T5's special ids (pad 0, </s> 1, <unk> 2, no <s>)."""
  corpus = directory / "corpus.txt"
  texts = [WORLD_TEXT * 20] + [p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]]
  corpus.write_text("\n".join(texts))
  prefix = directory / f"spiece-{normalization}"
  sentencepiece.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(prefix), vocab_size=300, model_type="unigram", character_coverage=1.0,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, seed_sentencepiece_size=100000,
      normalization_rule_name=normalization, minloglevel=2)
  return prefix.with_suffix(".model")


def randomise(model, seed):
  """Weights far from HF's init (whose tiny values would hide layout mistakes); norms around 1."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
      elif "relative_attention_bias" in name:
        p.copy_(torch.randn(p.shape, generator=generator))
      else:
        p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5 * 1.5)


def write_model(name, config, model_class, spiece, seed, *, tokenizer_json, shard_size=None):
  directory = OUT / name
  if directory.exists():
    shutil.rmtree(directory)
  directory.mkdir(parents=True)
  torch.manual_seed(seed)
  model = model_class(config).eval()
  randomise(model, seed)
  model.save_pretrained(directory, safe_serialization=True, **({"max_shard_size": shard_size} if shard_size else {}))
  shutil.copy(spiece, directory / "spiece.model")
  # from_pretrained converts the SentencePiece model (as for a real checkpoint); the constructor
  # given vocab_file= does not read it in transformers 5.
  tokenizer = transformers.T5Tokenizer.from_pretrained(directory, extra_ids=0)
  if tokenizer_json:
    tokenizer.save_pretrained(directory)
    for extra in directory.iterdir():  # Keep only what the loader reads: tokenizer.json.
      if extra.name not in ("tokenizer.json", "config.json") and not extra.name.startswith("model"):
        extra.unlink()
    tokenizer = transformers.T5Tokenizer.from_pretrained(directory, extra_ids=0)
  # The generation config is not part of an encoder.
  (directory / "generation_config.json").unlink(missing_ok=True)
  batch = tokenizer(CAPTIONS, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
  with torch.no_grad():
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
  np.savez_compressed(
      directory / "golden.npz", captions=np.asarray(CAPTIONS), ids=batch["input_ids"].numpy().astype(np.int32),
      mask=batch["attention_mask"].numpy().astype(bool), hidden=hidden.numpy().astype(np.float32))
  files = sorted(p.name for p in directory.iterdir())
  size = sum(p.stat().st_size for p in directory.iterdir())
  print(f"{directory.relative_to(REPO)}: {files}, {size / 1024:.0f} KiB")


def main():
  torch.set_num_threads(1)
  with tempfile.TemporaryDirectory() as tmp:
    # nmt_nfkc: T5's own normaliser (its character map is most of the file's 240 KiB);
    # identity: a second, small model for the ReLU encoder and UMT5.
    spiece = train_sentencepiece(pathlib.Path(tmp), "nmt_nfkc")
    small = train_sentencepiece(pathlib.Path(tmp), "identity")
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(spiece)).vocab_size()
    common = dict(vocab_size=vocab, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_decoder_layers=1,
                  relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0,
                  pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    write_model("t5", transformers.T5Config(num_layers=3, feed_forward_proj="gated-gelu", **common),
                transformers.T5EncoderModel, spiece, seed=1, tokenizer_json=False)
    write_model("t5_relu", transformers.T5Config(num_layers=2, feed_forward_proj="relu", **common),
                transformers.T5EncoderModel, small, seed=2, tokenizer_json=False)
    write_model("umt5", transformers.UMT5Config(num_layers=3, feed_forward_proj="gated-gelu", **common),
                transformers.UMT5EncoderModel, small, seed=3, tokenizer_json=True, shard_size="40KB")
  (OUT / "README.md").write_text(
      "Tiny random-weight T5 / UMT5 encoders in Hugging Face layout and the outputs of transformers "
      f"{transformers.__version__} (torch {torch.__version__}) on them: written by tools/make_t5_goldens.py, "
      "checked by tests/test_t5.py.\n")
  print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__}))


if __name__ == "__main__":
  main()
