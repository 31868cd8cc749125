"""Forward FLOPs of the DiT's cross-attention terms with 4096-wide precomputed text embeddings
(T5-XXL / UMT5-XXL), per packed row, for the pod and bench experiments; and a UMT5-XXL caption.
Run: python tools/text_cross_attention_flops.py (figures in docs/text.md)."""

from vidsim import config as config_lib
from vidsim.models import flops, t5
for name in ("pod_dit_8b_720p", "pod_dit_1b_256p", "dit_bench"):
  c = config_lib.load_config(f"experiments/{name}.py")
  if c.text.encoder != "precomputed":
    with c.unlocked():
      c.text.encoder = "precomputed"
  for embed_dim in (4096,):
    with c.unlocked():
      c.text.embed_dim = embed_dim
    k, s = c.train.max_segments_per_row, c.text.max_length
    terms = flops.dit_flops_breakdown(c, 1, c.train.row_tokens, k * s, k)
    total = sum(terms.values())
    text = {n: v for n, v in terms.items() if "cross" in n or n.startswith("text")}
    print(f"{name}: width {c.dit.width}, depth {c.dit.depth}, row {c.train.row_tokens} tokens, K={k} x S={s} text slots, E={embed_dim}, text.width {c.text.width}")
    print(f"  forward TFLOP per row: {total/1e12:.2f}")
    for n, v in text.items():
      print(f"  {n:32s} {v/1e12:8.3f} TFLOP  {100*v/total:5.2f}%")
xxl = t5.T5Config("umt5", 256384, 4096, 64, 10240, 24, 64, 32, 128, True, "gelu_new", 1e-6)
print(f"UMT5-XXL encoder, one caption of 128 tokens: {t5.encoder_flops(xxl, 1, 128)/1e12:.3f} TFLOP forward")
