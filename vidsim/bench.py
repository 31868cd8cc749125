"""`vidsim bench WHAT --config F [--out B.json]`: speed and memory figures.

Every benchmark measures the matmul rate (a large fp32 matmul) in the same process,
so MFU is against what this machine really does, and reports model FLOPs counted
explicitly (vidsim/models/flops.py, vae_flops). Results go to docs/benchmarks.md.
  data        decode + transform throughput with 0, 1, 2 grain workers
  vae         VAE train step time and MFU, encode clips/s
  dit         DiT train step time, tokens/s and MFU on packed rows (--peer-seconds S: and
              the ratio to a peer's step time)
  compare     the DiT step and the PyTorch peer (../shared/peers/torch_dit.py) at the same
              shape, alternated in one sitting: min / median / max of each and their ratio
  checkpoint  how long an async save blocks the loop, restore, restore onto another mesh
  text        captions per second of the byte encoder and of the text.t5_path T5/UMT5 (tokenizer included)
"""

import json
import os
import subprocess
import tempfile
import time

import grain
import jax
import numpy as np
from etils import epath
from flax import nnx

from vidsim import malloc
from vidsim import machine
from vidsim import mesh as mesh_lib
from vidsim.data import packing, pipeline
from vidsim.data.bench import bench_data
from vidsim.errors import UsageError
from vidsim.log import get_logger
from vidsim.models import flops as flops_lib
from vidsim.models import t5 as t5_lib
from vidsim.models import t5_loader
from vidsim.models import text as text_lib
from vidsim.models import vae as vae_lib
from vidsim.models.dit import patch_features, per_slot_enabled
from vidsim.quick_jit import quick_jit
from vidsim.train import checkpoint as ckpt_lib
from vidsim.train import dit_step
from vidsim.train.metrics import measure_matmul_flops_per_s, published_peak_flops_per_s
from vidsim.train.stage import assemble

log = get_logger("bench")


def run_bench(args, config):
  benchmarks = {"data": _bench_data, "vae": bench_vae, "dit": bench_dit, "checkpoint": bench_checkpoint,
                "text": bench_text, "compare": lambda c: bench_compare(c, args)}
  if args.what not in benchmarks:
    raise UsageError(f"unknown benchmark {args.what!r}; choose from {sorted(benchmarks)}")
  result = {"benchmark": args.what, "config": args.config, **_machine()}
  result.update(_matmul_rate())
  result.update(benchmarks[args.what](config))
  if "flops_per_s" in result:
    result["mfu"] = result["flops_per_s"] / result["matmul_flops_per_s"]
    if result["peak_flops_per_s"]:
      result["mfu_of_peak"] = result["flops_per_s"] / result["peak_flops_per_s"]
  if "executed_flops_per_s" in result:
    result["executed_mfu"] = result["executed_flops_per_s"] / result["matmul_flops_per_s"]
  memory = jax.devices()[0].memory_stats()  # None on CPU.
  if memory and "peak_bytes_in_use" in memory:
    result["device_peak_bytes"] = memory["peak_bytes_in_use"]
  peer = getattr(args, "peer_seconds", None)
  if peer and "step_time_s" in result:
    result["peer_step_time_s"] = peer
    result["ratio"] = result["step_time_s"] / peer  # <= 1: vidsim's step is no slower.
  text = json.dumps(result, indent=2, default=float)
  print(text)
  if args.out:
    epath.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(args.out).write_text(text + "\n")
  return result


def _matmul_rate():
  """The MFU denominator, measured here: a 2048^3 fp32 matmul on CPU (the models' dtype
  there; no published peak); an 8192^3 bf16 one on an accelerator, whose fp32 matmul
  runs on other units (or as TF32) and whose bf16 rate is what its models are built for.
  `peak_flops_per_s` is the chip's published bf16 peak where known (mfu_of_peak)."""
  if jax.default_backend() == "cpu":
    size, dtype = 2048, "float32"
  else:
    size, dtype = 8192, "bfloat16"
  return {"matmul_flops_per_s": measure_matmul_flops_per_s(size, dtype=jax.numpy.dtype(dtype)),
          "matmul_size": size, "matmul_dtype": dtype,
          "peak_flops_per_s": published_peak_flops_per_s(jax.devices()[0].device_kind)}


def _machine():
  return {
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
      "device_kind": jax.devices()[0].device_kind,
      "cpu": machine.cpu_model(),
      "cores": machine.cores(),
      "malloc_hugepages": malloc.hugepages_active(),  # vidsim/malloc.py: ~13% of a DiT step on CPU.
  }


def _bench_data(config):
  return bench_data(config)


def _time_steps(step, state, batch, warmup, steps):
  """Median seconds per call after `warmup` calls (which include compilation)."""
  for _ in range(warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  return state, float(np.median(times)), times


# ------------------------------------------------------------------ DiT


def synthetic_packed_batch(config, rows=None, segments_per_row=2, seed=0):
  """Full rows of `segments_per_row` equal video segments (4 frames of tokens/4 each, 8
  tokens wide), random latents, one caption per segment (the other slots empty, as the
  packer leaves them), and `slot_tokens` where the packer would add it."""
  tc = config.train
  rows = rows or tc.rows_per_batch
  length = tc.row_tokens
  k = config.train.max_segments_per_row
  patch_dim = int(np.prod(config.dit.patch_size)) * config.vae.latent_channels
  rng = np.random.default_rng(seed)
  per_segment = length // segments_per_row
  segment_ids = np.repeat(np.arange(1, segments_per_row + 1), per_segment)
  segment_ids = np.pad(segment_ids, (0, length - len(segment_ids)))
  frames = 4
  per_frame = max(per_segment // frames, 1)
  within = np.arange(per_segment)
  positions = np.stack([within // per_frame, (within % per_frame) // 8, within % 8], -1)
  positions = np.concatenate([np.tile(positions, (segments_per_row, 1)), np.zeros((length - segments_per_row * per_segment, 3), int)])
  segment_frames = np.zeros((k,), np.int32)
  segment_frames[:segments_per_row] = frames
  captions = ["a red 3 moves left while a blue 7 falls"] * segments_per_row + [""] * (k - segments_per_row)
  ids, mask = text_lib.tokenize_bytes(captions, config.text.max_length)
  capacity = packing.slot_capacity(per_segment, length)
  batch = {
      "tokens": rng.standard_normal((rows, length, patch_dim)).astype(np.float32),
      "positions": np.broadcast_to(positions, (rows, length, 3)).astype(np.int32),
      "segment_ids": np.broadcast_to(segment_ids, (rows, length)).astype(np.int32),
      "segment_frames": np.broadcast_to(segment_frames, (rows, k)).astype(np.int32),
      "text_tokens": np.broadcast_to(ids, (rows, k, ids.shape[-1])).astype(np.int32),
      "text_mask": np.broadcast_to(mask, (rows, k, mask.shape[-1])).copy(),
  }
  if config.text.encoder == "precomputed":  # An offline encoder's cached embeddings, as latents.py loads them.
    embeddings = rng.standard_normal((k, mask.shape[-1], config.text.embed_dim)).astype(np.float32) * mask[..., None]
    batch["text_embeddings"] = np.broadcast_to(embeddings, (rows, *embeddings.shape))
    del batch["text_tokens"]
  if capacity:  # As the packer lays out rows of samples up to half a row long.
    batch["slot_tokens"] = packing.slot_positions(batch["segment_ids"], k, capacity)
  return batch


def _stage_setup(config, mesh, name):
  """A stage's real train state (on the mesh) and its jitted train step."""
  stage = assemble(config, mesh, name)
  state = quick_jit(stage.init_state, out_shardings=stage.state_shardings)()  # Runs once.
  step = jax.jit(stage.train_step, out_shardings=(stage.state_shardings, None), donate_argnums=0)
  return stage, state, step


def bench_dit(config):
  segments = config.bench.get("segments_per_row", 2)
  most = min(config.train.max_segments_per_row, config.train.row_tokens)
  if not 1 <= segments <= most:
    raise UsageError(f"bench.segments_per_row={segments}: use 1 to {most} (train.max_segments_per_row "
                     f"caption slots, one token a segment at least)")
  mesh = mesh_lib.make_mesh(config)
  dit_step.check_rows_per_batch(config, mesh)  # As `vidsim train` checks it: exit 2, not a sharding error.
  with mesh_lib.activate(mesh, config):
    _, state, step = _stage_setup(config, mesh, "dit")
    host = synthetic_packed_batch(config, segments_per_row=segments)
    batch = mesh_lib.make_global_batch(host, mesh, config)
    _, seconds, times = _time_steps(step, state, batch, config.bench.warmup, config.bench.steps)
  flops = dit_step.flops_for_batch(config, host, "useful")
  executed = dit_step.flops_for_batch(config, host, "executed")
  tokens = host["segment_ids"].size
  return {
      "model": {"width": config.dit.width, "depth": config.dit.depth, "heads": config.dit.heads,
                "params": flops_lib.dit_param_count(config)},
      "rows": host["segment_ids"].shape[0], "row_tokens": config.train.row_tokens,
      "segments_per_row": segments, "segment_blocks": config.dit.get("segment_blocks", 0),
      "per_slot_cross_attention": "slot_tokens" in host and per_slot_enabled(config.dit),
      "step_time_s": seconds, "step_times_s": times, "tokens_per_s": tokens / seconds,
      # MFU counts the useful work (within-segment attention, the captions in use);
      # executed is what the step computes (see vidsim/models/flops.py).
      "flops_per_step": flops, "flops_per_s": flops / seconds,
      "executed_flops_per_step": executed, "executed_flops_per_s": executed / seconds,
  }


# ------------------------------------------------------------------ DiT vs the PyTorch peer


def peer_arguments(config, segments_per_row=2):
  """The peer's command-line shape for the bench batch of this config: each segment of the
  synthetic rows is one of its samples. Raises UsageError where the peer cannot build the
  same model."""
  d, t, tc = config.dit, config.text, config.train
  problems = []
  if d.mlp != "swiglu" or d.mlp_ratio != 4.0:
    problems.append(f"dit.mlp={d.mlp!r}, dit.mlp_ratio={d.mlp_ratio} (the peer: swiglu, 4.0)")
  # dit.position_embedding="sincos" (an elementwise add the peer lacks) is let through.
  if not d.qk_norm or t.encoder != "bytes" or t.heads != 4:
    problems.append("the peer has QK-norm and a byte text encoder of 4 heads")
  per_segment = tc.row_tokens // segments_per_row
  if per_segment % 32:
    problems.append(f"train.row_tokens / {segments_per_row} = {per_segment} tokens a sample: the peer needs a multiple of 32")
  if problems:
    raise UsageError("bench compare: the peer cannot run this config's model: " + "; ".join(problems))
  return ["--samples", str(tc.rows_per_batch * segments_per_row), "--tokens", str(per_segment),
          "--width", str(d.width), "--depth", str(d.depth), "--heads", str(d.heads),
          "--caption", str(t.max_length), "--patch-features", str(patch_features(config)),
          "--text-width", str(t.width), "--text-depth", str(t.depth)]


def run_peer(python, script, arguments):
  """One peer process: 2 untimed steps, 5 timed; its JSON line (step_s_median, step_s_min)."""
  done = subprocess.run([python, script, "eager", *arguments], capture_output=True, text=True, check=False)
  if done.returncode:
    raise UsageError(f"the peer {script} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def bench_compare(config, args):
  """vidsim's DiT step and the PyTorch peer at the same shape, alternated `--rounds` times
  in one sitting: each round runs the peer (its own process: 2 + 5 steps) and then times
  bench.steps vidsim steps on the state compiled once. Each round gives each side's median
  step; the report has min / median / max over the rounds and the ratio of the medians."""
  script = epath.Path(args.peer or os.environ.get("VIDSIM_PEER", "../shared/peers/torch_dit.py"))
  python = args.peer_python or os.environ.get("VIDSIM_PEER_PYTHON", "python3")
  if not script.exists():
    raise UsageError(f"bench compare: no peer script at {script}; pass --peer PATH or set VIDSIM_PEER")
  arguments = peer_arguments(config)
  mesh = mesh_lib.make_mesh(config)
  dit_step.check_rows_per_batch(config, mesh)  # As `vidsim train` checks it: exit 2, not a sharding error.
  with mesh_lib.activate(mesh, config):
    _, state, step = _stage_setup(config, mesh, "dit")
    host = synthetic_packed_batch(config)
    batch = mesh_lib.make_global_batch(host, mesh, config)
    for _ in range(config.bench.warmup):  # Compiles.
      state, _ = step(state, batch)
    ours, theirs = [], []
    for round_ in range(args.rounds):
      peer = run_peer(python, str(script), arguments)
      theirs.append(peer["step_s_median"])
      state, seconds, _ = _time_steps(step, state, batch, 0, config.bench.steps)
      ours.append(seconds)
      log.info("round %d: vidsim %.3f s, peer %.3f s", round_ + 1, seconds, theirs[-1])
  spread = lambda xs: {"min": min(xs), "median": float(np.median(xs)), "max": max(xs)}
  useful = dit_step.flops_for_batch(config, host, "useful")
  return {
      "peer": str(script), "peer_arguments": " ".join(arguments), "peer_threads": peer["threads"],
      "rounds": args.rounds, "step_time_s": float(np.median(ours)), "vidsim_step_s": spread(ours),
      "peer_step_s": spread(theirs), "vidsim_step_each_s": ours, "peer_step_each_s": theirs,
      "ratio": float(np.median(ours) / np.median(theirs)),  # <= 1: vidsim's step is no slower.
      "flops_per_step": useful, "flops_per_s": useful / float(np.median(ours)),
      "executed_flops_per_step": dit_step.flops_for_batch(config, host, "executed"),
  }


# ------------------------------------------------------------------ VAE


def bench_vae(config):
  mesh = mesh_lib.make_mesh(config)
  frames, height, width = max(config.data.buckets, key=lambda b: b[0] * b[1] * b[2])
  # The global batch the training pipeline makes for that bucket: a multiple of the data-parallel size.
  clips = pipeline.bucket_batch_sizes([(frames, height, width)], config.data.batch_size,
                                      config.data.max_batch_multiplier, mesh_lib.data_parallel_size(mesh, config))[0]
  rng = np.random.default_rng(0)
  video = rng.uniform(-1, 1, (clips, frames, height, width, 3)).astype(np.float32)
  with mesh_lib.activate(mesh, config):
    stage, state, step = _stage_setup(config, mesh, "vae")
    graphdef = stage.graphdef
    batch = mesh_lib.make_global_batch({"video": video}, mesh, config)
    state, seconds, times = _time_steps(step, state, batch, config.bench.warmup, config.bench.steps)
    encode = jax.jit(lambda p, v: nnx.merge(graphdef, p).encode(v)[0])
    _, encode_seconds, _ = _time_steps(lambda s, b: (s, encode(s, b)), state["params"], batch["video"],
                                       config.bench.warmup, config.bench.steps)
  flops = vae_lib.vae_flops(config, frames, height, width, train=True) * clips
  return {
      "clip_shape": [frames, height, width], "clips_per_step": clips,
      "step_time_s": seconds, "step_times_s": times, "train_clips_per_s": clips / seconds,
      "encode_clips_per_s": clips / encode_seconds,
      "flops_per_step": flops, "flops_per_s": flops / seconds,
  }


# ------------------------------------------------------------------ checkpoints


def bench_checkpoint(config):
  """What an async save costs the loop at the DiT bench state, then restores onto other layouts.

  Saves are timed where the loop makes them: right after a train step, on that step's
  fresh state. `save_blocking_s` is the mean wall time from the save call until the loop
  may run its next step; that step then runs while the files are written
  (`overlapped_step_s`, against `step_time_s` without a save), and `save_background_s` is
  what was still being written after it. Measured with the background thread the loop
  uses and, for comparison, with Orbax's save() called from the loop (`orbax_in_loop_*`).
  Restores are timed onto the same mesh, fsdp x tensor on the same devices and a mesh of
  half the devices, each checked bit for bit against the saved state.
  """
  mesh = mesh_lib.make_mesh(config)
  saves = max(config.bench.steps, 2)
  with tempfile.TemporaryDirectory() as tmp:
    directory = epath.Path(tmp)
    with mesh_lib.activate(mesh, config):
      _, state, step = _stage_setup(config, mesh, "dit")
      batch = mesh_lib.make_global_batch(synthetic_packed_batch(config), mesh, config)
      state, step_seconds, _ = _time_steps(step, state, batch, config.bench.warmup, config.bench.steps)
      result = {"mesh": mesh_lib.describe(mesh), "step_time_s": step_seconds,
                "state_bytes": sum(x.nbytes for x in jax.tree.leaves(state)), "saves_timed": saves}
      for prefix, background in (("", True), ("orbax_in_loop_", False)):
        saver = ckpt_lib.Checkpointer(directory / (prefix or "background"), keep_last=2, background_thread=background)
        state, timings = _timed_saves(saver, state, step, batch, saves)
        result.update({f"{prefix}{name}": value for name, value in _save_summary(timings, step_seconds).items()})
        saver.close()
      saved_step = saves + 2
      saver = ckpt_lib.Checkpointer(directory / "restore", async_save=False)
      saver.save(saved_step, state, _StaticIterator(), {}, {}, force=True)
      saver.close()
      expected = jax.tree.map(np.asarray, state)
      abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
      del state
    result["restores"] = [_timed_restore(directory / "restore", saved_step, abstract, expected, *layout)
                          for layout in _restore_layouts(config)]
  result["restore_s"] = result["restores"][0]["seconds"]
  return result


def _timed_saves(saver, state, step, batch, saves):
  """Each save follows a step (as in the loop); the step after it overlaps the write. One
  more save comes first: it pays one-time costs (the save thread, Orbax's compiled slices)."""
  timings = {"blocking": [], "overlapped_step": [], "background": []}
  state, _ = step(state, batch)
  jax.block_until_ready(state)
  for i in range(saves + 1):
    start = time.perf_counter()
    saver.save(i + 1, state, _StaticIterator(), {}, {}, force=True)
    returned = time.perf_counter()
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    stepped = time.perf_counter()
    saver.wait()
    timings["blocking"].append(returned - start)
    timings["overlapped_step"].append(stepped - returned)
    timings["background"].append(time.perf_counter() - stepped)
  return state, timings


def _save_summary(timings, step_seconds):
  first = {f"first_save_{name}_s": values.pop(0) for name, values in timings.items()}
  blocking = timings["blocking"]
  return {
      **first,
      "save_blocking_s": float(np.mean(blocking)), "save_blocking_max_s": float(np.max(blocking)),
      "save_blocking_fraction_of_step": float(np.mean(blocking)) / step_seconds,
      "save_blocking_each_s": blocking,
      "overlapped_step_s": float(np.median(timings["overlapped_step"])),
      "save_background_s": float(np.median(timings["background"])),
  }


def _restore_layouts(config):
  """(label, config, devices): the saved layout, fsdp x tensor on the same devices, half the devices."""
  devices = jax.devices()
  n = len(devices)
  layouts = [("same mesh", config, devices)]
  if n >= 2:
    layouts.append(("fsdp x tensor", _layout_config(config, fsdp=n // 2, tensor=2), devices))
    layouts.append(("half the devices", _layout_config(config, data=n // 2), devices[: n // 2]))
  return layouts


def _timed_restore(directory, saved_step, abstract, expected, label, config, devices):
  mesh = mesh_lib.make_mesh(config, devices)
  with mesh_lib.activate(mesh, config):
    shardings = assemble(config, mesh, "dit").state_shardings
    reader = ckpt_lib.Checkpointer(directory, read_only=True)
    start = time.perf_counter()
    restored = reader.restore(saved_step, ckpt_lib.abstract_like(abstract, shardings), _StaticIterator())
    jax.block_until_ready(restored)
    seconds = time.perf_counter() - start
    reader.close()
  exact = all(jax.tree.leaves(jax.tree.map(lambda r, e: bool(np.array_equal(np.asarray(r), e)), restored, expected)))
  return {"layout": label, "mesh": mesh_lib.describe(mesh), "devices": len(devices), "seconds": seconds,
          "bit_exact": exact}


def _layout_config(config, data=1, fsdp=1, tensor=1):
  """The same job on another single-slice mesh layout."""
  other = config.copy_and_resolve_references()
  with other.unlocked():
    other.mesh.ici.update(dict(data=data, fsdp=fsdp, sequence=1, tensor=tensor))
    other.mesh.dcn.update(dict(data=1, fsdp=1, sequence=1, tensor=1))
  return other


def _StaticIterator():
  """A tiny real grain iterator: the benchmark times the train-state item, not data."""
  return iter(grain.MapDataset.range(8).to_iter_dataset())


# ------------------------------------------------------------------ text encoders


def _bench_captions(n):
  """n captions of the embedded world's grammar, of varied length."""
  colors, moves = ("red", "blue", "green", "orange"), ("moves right", "slowly falls", "rises", "moves up and to the left")
  return [f"a {colors[i % 4]} {i % 10} {moves[i % 4]}" + (f" while a white {(i + 3) % 10} moves left" if i % 2 else "")
          for i in range(n)]


def _median_seconds(fn, warmup, steps):
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def bench_text(config):
  """Captions per second: the byte encoder (forward only, as inside the DiT: it trains with
  it), and the frozen T5/UMT5 of text.t5_path as `vidsim embed-text` and sampling run it
  (tokenizer, sharded forward, copy to the host). Batch: text.embed_batch_size captions."""
  n, b = config.text.embed_batch_size, config.bench
  captions = _bench_captions(n)
  mesh = mesh_lib.make_mesh(config)
  byte_config = config.copy_and_resolve_references()
  with byte_config.unlocked():
    byte_config.text.encoder = "bytes"
  with mesh_lib.activate(mesh, byte_config):
    encoder = text_lib.make_text_encoder(byte_config.text, dtype=config.dit.dtype, attention_impl=config.dit.attention_impl,
                                         rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(encoder)
    ids, mask = text_lib.tokenize_bytes(captions, config.text.max_length)
    forward = jax.jit(lambda p, i, m: nnx.merge(graphdef, p)({"text_tokens": i, "text_mask": m})[0])
    batch = {"text_tokens": ids[:, None], "text_mask": mask[:, None]}
    seconds = _median_seconds(lambda: forward(params, batch["text_tokens"], batch["text_mask"]), b.warmup, b.steps)
  result = {"captions_per_call": n, "max_length": config.text.max_length,
            "bytes": {"width": config.text.width, "depth": config.text.depth, "seconds": seconds, "captions_per_s": n / seconds}}
  if config.text.t5_path:
    t5 = t5_loader.load_text_encoder(config, mesh)
    start = time.perf_counter()
    t5.tokenizer(captions, config.text.max_length)
    tokenize = time.perf_counter() - start
    seconds = _median_seconds(lambda: t5.embed(captions)[0], b.warmup, b.steps)
    flops = t5_lib.encoder_flops(t5.t5_config, n, config.text.max_length)
    result["t5"] = {
        **t5.describe(), "params": t5.param_count, "tokenize_captions_per_s": n / max(tokenize, 1e-9),
        "seconds": seconds, "captions_per_s": n / seconds, "flops_per_call": flops, "flops_per_s": flops / seconds}
  return result
