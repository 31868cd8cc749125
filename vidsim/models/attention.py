"""Segment-aware attention behind one entry point, `attend`, with context parallelism.

    attend(q [R, T, H, D], k [R, S, H, D], v [R, S, H, D],
           q_segment_ids int [R, T], kv_segment_ids int [R, S], *, impl, ...) -> [R, T, H, D]

A query attends to the keys whose segment id equals its own and is > 0 (0 is padding
and matches nothing). A query without such a key (a padding token, a segment whose
caption is empty) outputs exactly 0 and gets no gradient. Nobody passes a dense
[T, S] mask or bias in: a backend that needs one builds it inside from the ids, so
the models never hold an [L, L] array (at 75k tokens a row it could not exist).

Backends (`impl`, every one computes the same thing):
- einsum: two einsums with logits and softmax in fp32 and a FlashAttention-style
  backward (`einsum_attention`); the fastest on XLA:CPU.
- xla / cudnn: `jax.nn.dot_product_attention` with a boolean mask built from the ids.
- splash: the Pallas TPU kernel `jax.experimental.pallas.ops.tpu.splash_attention`
  with `SegmentIds` (packed rows) and block sizes from the config; it runs in Pallas
  interpret mode when the target is not a TPU (tests on CPU).
- auto: einsum on CPU, cudnn on GPU, splash on TPU.

Context parallelism: when the ambient mesh (`vidsim.mesh.activate`) maps the logical
axis "length" to mesh axes of size > 1, `attend` runs inside `jax.shard_map` with
rows split along their length over those axes (and over "batch" / "heads" axes
where they divide). Self-attention keys and values are split the same way and are
combined by `context_parallel`:
- all_gather: every shard gathers the whole row's K/V and segment ids (MaxText's default);
- ring: K/V blocks travel around the axis with `ppermute` while an online softmax
  merges each block's log-sum-exp; the backward sends dK/dV around with them, so no
  shard ever holds more than one remote block;
- ulysses: all-to-all from length-split to head-split, full-length attention over a
  slice of the heads, all-to-all back (heads per shard must divide by the axis).
Cross-attention keys (the captions, short) are not split: each length shard attends
to all of them locally, with no communication. Lengths that do not divide the axis
are padded inside (segment id 0) and cut back.
"""

import functools
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from vidsim.errors import UsageError

IMPLS = ("auto", "einsum", "xla", "cudnn", "splash")
CONTEXT_PARALLEL = ("all_gather", "ring", "ulysses")
AUTO = {"cpu": "einsum", "gpu": "cudnn", "cuda": "cudnn", "rocm": "xla", "tpu": "splash"}
MASKED = -1e30  # Added to the logits of masked keys: exp underflows to exactly 0.
# Splash tile sizes (jax's splash_attention_kernel.BlockSizes fields). 512 is MaxText's
# default on v5p / v6e; every size is cut to the (128-rounded) length it tiles.
DEFAULT_BLOCK_SIZES = dict(
    block_q=512, block_kv=512, block_kv_compute=512,
    block_q_dkv=512, block_kv_dkv=512, block_kv_dkv_compute=512,
    block_q_dq=512, block_kv_dq=512,
)
Q_BLOCKS = ("block_q", "block_q_dkv", "block_q_dq")
KV_BLOCKS = ("block_kv", "block_kv_compute", "block_kv_dkv", "block_kv_dkv_compute", "block_kv_dq")
LANES = 128  # TPU vector lanes: splash tiles are multiples of this.


def check_impl(name: str, key: str = "dit.attention_impl") -> str:
  if name not in IMPLS:
    raise UsageError(f"{key} {name!r} is not one of {list(IMPLS)}")
  return name


def check_context_parallel(name, key: str = "dit.context_parallel"):
  if name is not None and name not in CONTEXT_PARALLEL:
    raise UsageError(f"{key} {name!r} is not one of {list(CONTEXT_PARALLEL)}")
  return name


def check_block_sizes(sizes, key: str = "dit.attention_block_sizes") -> dict:
  """Config block sizes (a mapping, possibly partial) -> a full dict of positive ints."""
  merged = dict(DEFAULT_BLOCK_SIZES)
  for name, value in dict(sizes or {}).items():
    if name not in DEFAULT_BLOCK_SIZES:
      raise UsageError(f"{key}.{name} is not a splash block size; valid: {list(DEFAULT_BLOCK_SIZES)}")
    if int(value) <= 0 or int(value) % LANES:
      raise UsageError(f"{key}.{name} = {value}: use a positive multiple of {LANES}")
    merged[name] = int(value)
  return merged


def target_platform() -> str:
  """The platform the code is compiled for: the ambient mesh's devices (compile-only TPU
  devices on a CPU host included), else the default backend."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def resolve_impl(impl: str) -> str:
  check_impl(impl)
  if impl == "auto":
    return AUTO.get(target_platform(), "xla")
  return impl


# ------------------------------------------------------------------ entry point


def attend(q, k, v, q_segment_ids, kv_segment_ids, *, impl, context_parallel="all_gather",
           block_sizes=None, kv_sharded=None):
  """Segment-masked attention; see the module docstring.

  impl: einsum | xla | cudnn | splash | auto. context_parallel: all_gather | ring |
  ulysses, or None to leave the length unsplit (the text encoder, the VAE).
  block_sizes: splash tile sizes (a mapping; missing ones from DEFAULT_BLOCK_SIZES).
  kv_sharded: k / v are the same sequence as q and split along the length with it
  (self-attention); False for cross-attention, whose keys every shard sees whole.
  None: self-attention when k is as long as q (the model layers say it explicitly).
  """
  impl = resolve_impl(impl)
  check_context_parallel(context_parallel, "attend(context_parallel=...)")
  r, t, h, d = q.shape
  if k.shape != v.shape or k.shape[0] != r or k.shape[2:] != (h, d):
    raise UsageError(f"attention shapes q {q.shape}, k {k.shape}, v {v.shape}: need [R, T, H, D] and [R, S, H, D]")
  if q_segment_ids.shape != (r, t) or kv_segment_ids.shape != k.shape[:2]:
    raise UsageError(
        f"segment ids {q_segment_ids.shape} / {kv_segment_ids.shape} do not match q {q.shape[:2]} / k {k.shape[:2]}"
    )
  if kv_sharded is None:
    kv_sharded = k.shape[1] == t
  if kv_sharded and context_parallel is not None and k.shape[1] != t:
    raise UsageError(f"self-attention (kv_sharded) needs q and k of one length, got {t} and {k.shape[1]}")
  q_ids = q_segment_ids.astype(jnp.int32)
  kv_ids = kv_segment_ids.astype(jnp.int32)
  sizes = tuple(sorted(check_block_sizes(block_sizes).items())) if impl == "splash" else ()
  local = functools.partial(_local_attention, impl=impl, block_sizes=sizes, interpret=target_platform() != "tpu")

  layout = _mesh_layout(r, h, context_parallel, impl)
  if layout is None:
    return local(q, k, v, q_ids, kv_ids)
  mesh, batch, length, heads = layout
  n = _size(mesh, length)
  if context_parallel == "ulysses" and n > 1 and kv_sharded and (h // _size(mesh, heads)) % n:
    raise UsageError(
        f"context_parallel='ulysses' splits the heads over the {'x'.join(length)} axis ({n}): "
        f"{h // _size(mesh, heads)} heads per shard do not divide by {n}; use all_gather or ring, "
        "or a heads count that divides"
    )
  pad = -t % n
  if pad:  # Padding tokens (segment 0) match nothing; they are cut off again below.
    widen = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    q, q_ids = widen(q), widen(q_ids)
    if kv_sharded:
      k, v, kv_ids = widen(k), widen(v), widen(kv_ids)

  seq = length or None
  q_spec, ids_spec = P(batch or None, seq, heads or None, None), P(batch or None, seq)
  if kv_sharded:
    kv_spec, kv_ids_spec = q_spec, ids_spec
  else:
    kv_spec, kv_ids_spec = P(batch or None, None, heads or None, None), P(batch or None, None)

  def sharded(q, k, v, q_ids, kv_ids):
    if n == 1 or not kv_sharded:
      return local(q, k, v, q_ids, kv_ids)
    if context_parallel == "all_gather":
      gather = lambda x: jax.lax.all_gather(x, length, axis=1, tiled=True)
      return local(q, gather(k), gather(v), q_ids, gather(kv_ids))
    if context_parallel == "ring":
      return ring_attention(q, k, v, q_ids, kv_ids, length, n)
    # Ulysses: [R, T/n, H, D] -> [R, T, H/n, D], attend over the whole row, and back.
    to_heads = lambda x: jax.lax.all_to_all(x, length, split_axis=2, concat_axis=1, tiled=True)
    gather = lambda x: jax.lax.all_gather(x, length, axis=1, tiled=True)
    whole = gather(q_ids)
    out = local(to_heads(q), to_heads(k), to_heads(v), whole, whole if kv_ids is q_ids else gather(kv_ids))
    return jax.lax.all_to_all(out, length, split_axis=1, concat_axis=2, tiled=True)

  # Unchecked (as MaxText maps its kernels): Pallas calls and the custom VJPs here carry
  # no varying-manual-axes types. shard_map's transpose still sums the gradients of
  # inputs that are whole on every shard (the captions' K/V) over the axes that split q.
  out = jax.shard_map(
      sharded, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, ids_spec, kv_ids_spec), out_specs=q_spec,
      check_vma=False,
  )(q, k, v, q_ids, kv_ids)
  return out[:, :t] if pad else out


def _size(mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _mesh_axes(name):
  axes = nn.logical_to_mesh_axes((name,))[0]
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def length_is_split() -> bool:
  """True when the ambient mesh splits the logical "length" axis (context parallelism)."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and _size(mesh, _mesh_axes("length")) > 1


def _mesh_layout(rows, heads, context_parallel, impl):
  """(mesh, batch axes, length axes, head axes) for shard_map, or None to call the
  backend directly (no mesh, or nothing to split: GSPMD partitions the einsum/XLA
  paths by itself; a Pallas kernel must always be mapped)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  batch, heads_axes = _mesh_axes("batch"), _mesh_axes("heads")
  length = _mesh_axes("length") if context_parallel is not None else ()
  # Split rows / heads only over axes that divide them (shard_map needs even blocks).
  batch = batch if rows % _size(mesh, batch) == 0 else ()
  heads_axes = heads_axes if heads % _size(mesh, heads_axes) == 0 else ()
  length = tuple(a for a in length if a not in batch + heads_axes)
  if _size(mesh, length) == 1 and impl != "splash":
    return None
  return mesh, batch, length, heads_axes


# ------------------------------------------------------------------ local backends


def _local_attention(q, k, v, q_ids, kv_ids, *, impl, block_sizes, interpret):
  """One device's attention over whole keys; rows without a key give exactly 0."""
  if impl == "einsum":
    return einsum_attention(q, k, v, q_ids, kv_ids)
  if impl in ("xla", "cudnn"):
    allowed = segment_mask(q_ids, kv_ids)  # [R, T, S]
    out = jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], implementation=impl)
    return jnp.where(allowed.any(-1)[:, :, None, None], out, 0).astype(q.dtype)
  if impl == "splash":
    return splash_attention(q, k, v, q_ids, kv_ids, dict(block_sizes), interpret)
  raise UsageError(f"attention impl {impl!r} is not one of {list(IMPLS)}")


def segment_mask(q_ids, kv_ids):
  """[R, T], [R, S] -> bool [R, T, S]: same segment, and not padding."""
  return (q_ids[:, :, None] == kv_ids[:, None, :]) & (q_ids > 0)[:, :, None]


def segment_bias(q_ids, kv_ids):
  """[R, T], [R, S] -> fp32 [R, 1, T, S]: 0 where a query may attend, MASKED elsewhere."""
  return jnp.where(segment_mask(q_ids, kv_ids), 0.0, MASKED).astype(jnp.float32)[:, None]


def has_key(q_ids, kv_ids):
  """[R, T] bool: the query's segment is > 0 and occurs among the keys. Sorted search,
  O((T + S) log S), so no [T, S] array is made."""

  def row(q, kv):
    kv = jnp.sort(kv)
    at = jnp.clip(jnp.searchsorted(kv, q), 0, kv.shape[0] - 1)
    return (kv[at] == q) & (q > 0)

  return jax.vmap(row)(q_ids, kv_ids)


# ------------------------------------------------------------------ einsum


@jax.custom_vjp
def einsum_attention(q, k, v, q_ids, kv_ids):
  """Softmax attention as two einsums (logits and softmax in fp32) with a
  FlashAttention-style backward (`_einsum_attention_bwd`); the bias is built here from
  the segment ids (XLA fuses it into the logits) and rebuilt in the backward.

  Why not jax.nn.dot_product_attention(implementation="xla"): on XLA:CPU (jax 0.10.2)
  the same math runs slower through it (attention alone, forward + backward at
  [2, 1024, 8, 64]: 1.8x; a whole DiT bench train step: 5.04 s vs 4.32 s, see
  docs/benchmarks.md "## DiT"), and there is no fused CPU kernel.
  """
  return _einsum_attention_fwd(q, k, v, q_ids, kv_ids)[0]


def _logits(q, k, bias):
  scale = q.shape[-1] ** -0.5
  return jnp.einsum("rthd,rshd->rhts", q, k, preferred_element_type=jnp.float32) * scale + bias


def _keyless(lse):
  """[R, H, T] log-sum-exp -> [R, T, H, 1]: True where the query saw no key (its
  logits were all MASKED, so its softmax averaged every key)."""
  return jnp.moveaxis(lse < MASKED / 2, 1, 2)[..., None]


def _block_attention(q, k, v, q_ids, kv_ids):
  """Unnormalised-then-normalised attention over one key block: (out [R, T, H, D] in
  fp32, lse [R, H, T]). Normalises after the value einsum ([T, D] per head, not [T, S])."""
  logits = _logits(q, k, segment_bias(q_ids, kv_ids))
  peak = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
  unnormalised = jnp.exp(logits - peak)
  total = unnormalised.sum(-1, keepdims=True)  # [R, H, T, 1]
  out = jnp.einsum("rhts,rshd->rthd", unnormalised.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out / jnp.moveaxis(total, 1, 2), (peak + jnp.log(total))[..., 0]


def _einsum_attention_fwd(q, k, v, q_ids, kv_ids):
  """Keeps only the output and the log-sum-exp for the backward. Their names let the
  remat policy save these two small arrays, so the backward recomputes the logits once
  instead of the whole forward (see layers.REMAT_POLICIES)."""
  out, lse = _block_attention(q, k, v, q_ids, kv_ids)
  out = checkpoint_name(jnp.where(_keyless(lse), 0, out).astype(q.dtype), "attention_out")
  lse = checkpoint_name(lse, "attention_lse")
  return out, (q, k, v, q_ids, kv_ids, out, lse)


def _block_grads(q, k, v, bias, d_out, lse, delta):
  """One key block's share of the backward given the final lse and delta = rowsum(dO*O):
  dLogits = P * (dP - delta) (FlashAttention's identity: the row sum is over [T, D], not
  [T, S], so the backward makes two passes over the logits, not the softmax VJP's three).
  Returns fp32 (dq, dk, dv)."""
  probs = jnp.exp(_logits(q, k, bias) - lse[..., None])
  d_v = jnp.einsum("rhts,rthd->rshd", probs.astype(d_out.dtype), d_out, preferred_element_type=jnp.float32)
  d_probs = jnp.einsum("rthd,rshd->rhts", d_out, v, preferred_element_type=jnp.float32)
  # The gradient of the unscaled q.k scores: the logits' gradient times the scale.
  d_scores = (probs * (d_probs - delta[..., None]) * q.shape[-1] ** -0.5).astype(q.dtype)
  d_q = jnp.einsum("rhts,rshd->rthd", d_scores, k, preferred_element_type=jnp.float32)
  d_k = jnp.einsum("rhts,rthd->rshd", d_scores, q, preferred_element_type=jnp.float32)
  return d_q, d_k, d_v


def _einsum_attention_bwd(residuals, d_out):
  q, k, v, q_ids, kv_ids, out, lse = residuals
  d_out = jnp.where(_keyless(lse), 0, d_out)  # Keyless rows output a constant 0.
  delta = jnp.einsum("rthd,rthd->rht", d_out.astype(jnp.float32), out.astype(jnp.float32))
  d_q, d_k, d_v = _block_grads(q, k, v, segment_bias(q_ids, kv_ids), d_out, lse, delta)
  # Segment ids are integers: they have no gradient.
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None, None


einsum_attention.defvjp(_einsum_attention_fwd, _einsum_attention_bwd)


# ------------------------------------------------------------------ ring


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def ring_attention(q, k, v, q_ids, kv_ids, axis, n):
  """Inside shard_map: this shard's queries against every shard's K/V, which travel
  around `axis` (n shards) one block per step; each block's (out, lse) is merged into
  the running result by log-sum-exp. Blocks use the einsum math (`_block_attention`);
  the backward (`_ring_bwd`) sends dK/dV around with their blocks, home after n hops."""
  return _ring_fwd(q, k, v, q_ids, kv_ids, axis, n)[0]


def _next(axis, n, *xs):
  perm = [(i, (i + 1) % n) for i in range(n)]
  return tuple(jax.lax.ppermute(x, axis, perm) for x in xs)


def _ring_fwd(q, k, v, q_ids, kv_ids, axis, n):
  out, lse = _block_attention(q, k, v, q_ids, kv_ids)

  def step(carry, _):
    out, lse, k, v, kv_ids = carry
    k, v, kv_ids = _next(axis, n, k, v, kv_ids)
    block_out, block_lse = _block_attention(q, k, v, q_ids, kv_ids)
    merged = jnp.logaddexp(lse, block_lse)
    weight = lambda l: jnp.moveaxis(jnp.exp(l - merged), 1, 2)[..., None]
    return (out * weight(lse) + block_out * weight(block_lse), merged, k, v, kv_ids), None

  (out, lse, *_), _ = jax.lax.scan(step, (out, lse, k, v, kv_ids), length=n - 1)
  out = checkpoint_name(jnp.where(_keyless(lse), 0, out).astype(q.dtype), "attention_out")
  lse = checkpoint_name(lse, "attention_lse")
  return out, (q, k, v, q_ids, kv_ids, out, lse)


def _ring_bwd(axis, n, residuals, d_out):
  q, k, v, q_ids, kv_ids, out, lse = residuals
  d_out = jnp.where(_keyless(lse), 0, d_out)
  delta = jnp.einsum("rthd,rthd->rht", d_out.astype(jnp.float32), out.astype(jnp.float32))

  def grads(k, v, kv_ids):
    return _block_grads(q, k, v, segment_bias(q_ids, kv_ids), d_out, lse, delta)

  def step(carry, _):
    d_q, k, v, kv_ids, d_k, d_v = carry
    dq, dk, dv = grads(k, v, kv_ids)
    k, v, kv_ids, d_k, d_v = _next(axis, n, k, v, kv_ids, d_k + dk, d_v + dv)
    return (d_q + dq, k, v, kv_ids, d_k, d_v), None

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  carry = (zeros(q), k, v, kv_ids, zeros(k), zeros(v))
  (d_q, k, v, kv_ids, d_k, d_v), _ = jax.lax.scan(step, carry, length=n - 1)
  dq, dk, dv = grads(k, v, kv_ids)
  d_k, d_v = _next(axis, n, d_k + dk, d_v + dv)  # The n-th hop brings each block home.
  return (d_q + dq).astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None, None


ring_attention.defvjp(_ring_fwd, _ring_bwd)


# ------------------------------------------------------------------ splash


def _tile(length: int, block: int) -> int:
  """A tile no larger than the (lane-rounded) length it tiles."""
  return min(block, -(-length // LANES) * LANES)


def _splash_kernel(t, s, heads, block_sizes, interpret):
  """A splash kernel for [H, t, D] x [H, s, D] with segment ids and no static mask
  (full masks: segment ids do all the masking). Built inside the trace, so its
  mask-info arrays are constants of the compiled program: eager arrays would need the
  ambient mesh's devices, which under `vidsim compile` are compile-only TPUs. The
  costly part, walking every block pair in Python, is cached by jax (_process_mask)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  mask = masks.MultiHeadMask([masks.FullMask((t, s)) for _ in range(heads)])
  return splash.make_splash_mha(
      mask, block_sizes=splash.BlockSizes(**dict(block_sizes)), head_shards=1, q_seq_shards=1,
      interpret=interpret,
  )


def splash_attention(q, k, v, q_ids, kv_ids, block_sizes, interpret):
  """q [R, T, H, D] x k/v [R, S, H, D] through the splash kernel, one row at a time
  (vmap). q is pre-scaled by D**-0.5 (the kernel does not scale); T and S are padded
  to their tiles with segment id 0, and rows without a key are zeroed."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

  r, t, h, d = q.shape
  s = k.shape[1]
  tiles = {name: _tile(t, size) for name, size in block_sizes.items() if name in Q_BLOCKS}
  tiles.update({name: _tile(s, size) for name, size in block_sizes.items() if name in KV_BLOCKS})
  t_pad = -t % math.lcm(*(tiles[n] for n in Q_BLOCKS))
  s_pad = -s % math.lcm(*(tiles[n] for n in KV_BLOCKS))
  kernel = _splash_kernel(t + t_pad, s + s_pad, h, tuple(sorted(tiles.items())), interpret)

  def heads_major(x, pad):
    return jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)

  scaled = (q.astype(jnp.float32) * d**-0.5).astype(q.dtype)
  ids = splash.SegmentIds(jnp.pad(q_ids, [(0, 0), (0, t_pad)]), jnp.pad(kv_ids, [(0, 0), (0, s_pad)]))
  out = jax.vmap(kernel)(heads_major(scaled, t_pad), heads_major(k, s_pad), heads_major(v, s_pad), ids)
  out = out.transpose(0, 2, 1, 3)[:, :t]
  return jnp.where(has_key(q_ids, kv_ids)[:, :, None, None], out, 0).astype(q.dtype)
