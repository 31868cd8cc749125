"""The base config and the loader for experiment files and command-line overrides.

Every key vidsim reads is defined here, once, with a default and a one-line comment.
Experiment files (`experiments/*.py`) start from `base_config()` and only override;
the returned ConfigDict is locked, so a mistyped key is an error, not a new key.

Command line (same syntax as ml_collections.config_flags):
  --config experiments/x.py --config.dit.depth=4 --config.mesh.ici.fsdp=2
"""

import ast
import difflib
import importlib.util
import json
import os

from ml_collections import ConfigDict

from vidsim.errors import UsageError

# Mesh axes, in mesh order. ICI axes inside a slice, the same names over DCN.
MESH_AXES = ("data", "fsdp", "sequence", "tensor")


def base_config() -> ConfigDict:
  """Every key with its default. Sections: mesh, distributed, data, moving_digits,
  video_folder, vae, vae_train, encode, dit, text, flow, train, sample, eval, bench."""
  c = ConfigDict()
  c.seed = 0  # Seed for parameters, data order and noise; runs with one seed repeat exactly.
  c.init_from = ""  # Checkpoint dir to load model weights from (weights only; resume wins).
  c.peak_flops_per_device = 0.0  # FLOP/s per device for MFU; 0 = known TPU peak, or measured matmul rate on CPU.
  # jax's persistent compilation cache (local path or gs://): a restart reads its compiled
  # steps instead of compiling again. "{workdir}" is the command's --workdir; '' = off.
  c.compile_cache_dir = "{workdir}/compile_cache"
  c.compile_cache_min_compile_s = 1.0  # Only computations that took longer than this to compile are cached.

  # ---------------------------------------------------------------- mesh
  c.mesh = ConfigDict()
  c.mesh.ici = ConfigDict(dict(data=-1, fsdp=1, sequence=1, tensor=1))  # Axis sizes in a slice; -1 fills.
  c.mesh.dcn = ConfigDict(dict(data=1, fsdp=1, sequence=1, tensor=1))  # Axis sizes across slices.
  # CPU backend: jax devices per process (jax_num_cpu_devices), each running its share of
  # the batch on its own thread. At the embedded configs' small widths XLA:CPU keeps 2
  # cores busier as 2 data-parallel devices than as one (docs/benchmarks.md, "Devices per core").
  # 0 = jax's default: 1, or XLA_FLAGS' --xla_force_host_platform_device_count.
  c.mesh.cpu_devices = 0
  # Logical axis name -> mesh axes (a tuple; () replicates). One table for every model.
  c.mesh.rules = ConfigDict(
      dict(
          batch=("data", "fsdp"),  # Examples / packed rows.
          length=("sequence",),  # Tokens within a row.
          embed=("fsdp",),  # Model width: params are fsdp-sharded along it.
          mlp=("tensor",),  # MLP hidden units.
          heads=("tensor",),  # Attention heads.
          kv=(),  # Per-head features.
          layers=(),  # The stacked axis of scanned blocks.
          vocab=(),  # Byte vocabulary of the text encoder.
          text_length=(),  # Text tokens.
          conv_in=(),  # VAE conv input channels.
          conv_out=("fsdp",),  # VAE conv output channels.
          norm=(),  # Norm scales and biases.
      )
  )

  # ---------------------------------------------------------------- distributed
  c.distributed = ConfigDict()
  c.distributed.coordinator_address = ""  # host:port of process 0; '' = env VIDSIM_COORDINATOR or auto.
  c.distributed.num_processes = 0  # 0 = env VIDSIM_NUM_PROCESSES or auto (1 unless on TPU).
  c.distributed.process_id = -1  # -1 = env VIDSIM_PROCESS_ID or auto.
  c.distributed.cpu_collectives = "gloo"  # CPU collectives across processes: gloo | mpi.
  c.distributed.initialization_timeout_s = 300  # Give up on a missing peer after this.
  # A process that sends no heartbeat for this long is declared dead; every other process
  # then exits non-zero naming it (bounds how long a dead host can hold the job).
  c.distributed.heartbeat_timeout_s = 100
  c.distributed.shutdown_timeout_s = 300  # At exit, how long a process waits for the others to finish.

  # ---------------------------------------------------------------- data (pixels)
  c.data = ConfigDict()
  c.data.builder = "moving_digits"  # TFDS builder: moving_digits | video_folder.
  c.data.builder_config = "mixed"  # Builder config, e.g. moving_digits: fixed | mixed | images | occlusion.
  c.data.data_dir = ""  # TFDS data_dir; '' = env VIDSIM_DATA_DIR or ~/.cache/vidsim/datasets.
  c.data.train_split = "train"  # Split the training stages read.
  c.data.eval_split = "validation"  # Split evaluation and validation metrics read.
  # (frames, height, width) buckets; clips go to the nearest by aspect, area and duration.
  c.data.buckets = ((9, 32, 32), (9, 24, 40), (9, 40, 24), (1, 32, 32), (1, 24, 40), (1, 40, 24))
  c.data.batch_size = 16  # Global clips per batch for the largest bucket; smaller buckets get more.
  c.data.max_batch_multiplier = 8  # Cap on how many times batch_size a small bucket (an image) gets.
  c.data.worker_count = 0  # grain decode worker processes (0 = in the main process).
  c.data.prefetch = 2  # Batches prefetched per worker.
  c.data.shuffle = True  # Shuffle per epoch from (seed, epoch).
  c.data.random_crop = True  # Random temporal crop and crop offset (False = first frames, centre crop).

  # ---------------------------------------------------------------- moving_digits world
  c.moving_digits = ConfigDict()
  c.moving_digits.train_examples = 2000  # Examples in the train split.
  c.moving_digits.eval_examples = 200  # Examples in the validation and test splits.
  c.moving_digits.seed = 0  # Render seed; the dataset is a pure function of these keys.
  c.moving_digits.frames = 9  # Frames per clip (fixed and occlusion configs).
  c.moving_digits.height = 32  # Frame height in pixels (fixed and occlusion configs).
  c.moving_digits.width = 32  # Frame width in pixels (fixed and occlusion configs).
  c.moving_digits.fps = 8.0  # Frame rate stored with each clip.
  # (frames, height, width) drawn per example by the mixed config; the images config uses (1, h, w).
  c.moving_digits.mixed_shapes = ((9, 32, 32), (17, 32, 32), (9, 24, 40), (13, 40, 24), (9, 24, 56), (1, 32, 32))
  c.moving_digits.digit_size = 12  # Side of a digit sprite in pixels (8x8 sklearn digits upscaled).
  c.moving_digits.max_digits = 2  # Each scene has 1..max_digits digits.
  c.moving_digits.speed = (0.5, 2.5)  # Range of digit speed in pixels per frame.
  # "bounce": starts anywhere, fast digits bounce early; "inside": paths stay in the frame
  # so the caption's direction holds for the whole clip (moving_digits.render_scene).
  c.moving_digits.paths = "bounce"
  c.moving_digits.colors = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "orange")  # Digit colours.
  c.moving_digits.occlusion_shape = (13, 32, 48)  # (frames, height, width) of occlusion scenes (room to pass behind).
  c.moving_digits.occluder_width = 14  # Width of the grey bar; >= digit_size so digits can hide fully.
  # Captions: default (one fixed grammar, "a red 3 moves right while a blue 7 falls") | short (paraphrases
  # of it) | descriptive (colour, digit, start position, direction, speed, the grey bar, the other digits;
  # paraphrased) | mixed (short or descriptive, drawn per example). moving_digits.caption_text.
  c.moving_digits.captions = "default"

  # ---------------------------------------------------------------- video_folder
  c.video_folder = ConfigDict()
  c.video_folder.path = ""  # Folder of videos and images (searched recursively).
  c.video_folder.captions = "captions.jsonl"  # JSONL sidecar in the folder: {"file", "caption"}.
  c.video_folder.max_frames = 33  # Clips hold at most this many frames.
  c.video_folder.fps = 8.0  # Clips are resampled to this frame rate.
  c.video_folder.max_area = 128 * 128  # Frames larger than this many pixels are downscaled.
  c.video_folder.validation_fraction = 0.05  # Share of files held out for validation.
  c.video_folder.frame_format = "jpeg"  # How frames are stored: jpeg (compact) | png (lossless).
  c.video_folder.jpeg_quality = 90  # JPEG quality of stored frames.
  c.video_folder.min_clip_frames = 0  # Drop a video's trailing clip shorter than this (0 = max_frames // 2).

  # ---------------------------------------------------------------- VAE model
  c.vae = ConfigDict()
  c.vae.temporal_compression = 4  # ct: T frames -> 1 + (T-1)/ct latent frames (1, 2, 4).
  c.vae.spatial_compression = 4  # cs: H, W -> H/cs, W/cs (4, 8, 16).
  c.vae.latent_channels = 4  # Channels of the latent grid.
  c.vae.widths = (16, 32, 64)  # Channels per resolution level (len = log2(cs) + 1).
  c.vae.blocks_per_level = 1  # Residual blocks per level.
  c.vae.attention = False  # Self-attention within each frame at the lowest level.
  c.vae.attention_impl = "xla"  # Its backend: xla | einsum | cudnn | splash | auto (as dit.attention_impl).
  c.vae.spatial_only_levels = 2  # The first N (highest-res) levels use (1,3,3) convs, the rest causal 3x3x3.
  c.vae.causal_padding = "replicate"  # Front time padding: replicate (copies of frame 0) | zeros.
  c.vae.dtype = "float32"  # Compute dtype: float32 | bfloat16 (params stay float32).

  # ---------------------------------------------------------------- VAE training
  c.vae_train = ConfigDict()
  c.vae_train.steps = 2000  # Optimizer steps.
  c.vae_train.learning_rate = 1e-3  # Peak learning rate.
  c.vae_train.warmup_steps = 100  # Linear warmup steps, then cosine decay.
  c.vae_train.end_lr_fraction = 0.1  # Final learning rate as a fraction of the peak (1.0 = constant after warmup).
  c.vae_train.weight_decay = 0.0  # AdamW weight decay.
  c.vae_train.grad_clip = 1.0  # Global-norm gradient clipping (0 = off).
  c.vae_train.recon_loss = "l1"  # Reconstruction loss: l1 | l2.
  c.vae_train.kl_weight = 1e-6  # beta: weight of the KL term (KL averaged per latent element).
  c.vae_train.frame_diff_weight = 0.0  # Weight of the temporal frame-difference term (0 = off).
  c.vae_train.ema_decay = 0.999  # EMA of weights (0 = off).
  c.vae_train.log_every = 20  # Steps between metrics lines.
  c.vae_train.checkpoint_every = 200  # Steps between checkpoints.
  c.vae_train.recon_every = 500  # Steps between reconstruction videos.
  # After the last step: PSNR and SSIM over the whole eval split into W/eval/vae_psnr_<split>.json
  # (false skips it: `vidsim eval-vae`, or `vidsim eval --what vae` into W/eval/vae.json, later).
  c.vae_train.final_eval = True

  # ---------------------------------------------------------------- latent cache
  c.encode = ConfigDict()
  c.encode.examples_per_shard = 256  # Examples per ArrayRecord shard of the latent cache.
  c.encode.batch_size = 16  # Clips per encode batch (global).
  c.encode.splits = ("train", "validation")  # Splits to encode.
  c.encode.tile_frames = 0  # Temporal chunk for tiled encode (0 = untiled).
  c.encode.tile_size = 0  # Spatial tile for tiled encode (0 = untiled).

  # ---------------------------------------------------------------- DiT model
  c.dit = ConfigDict()
  c.dit.patch_size = (1, 2, 2)  # (pt, ph, pw) spacetime patch in latent units.
  c.dit.width = 256  # Model width.
  c.dit.depth = 6  # Transformer blocks (scanned).
  c.dit.heads = 4  # Attention heads.
  c.dit.mlp_ratio = 4.0  # MLP hidden = mlp_ratio * width (SwiGLU: 2/3 of it, rounded up to 8; same cost).
  c.dit.mlp = "gelu"  # MLP: gelu | swiglu.
  c.dit.qk_norm = True  # RMS-normalise queries and keys.
  c.dit.rope_theta = 10000.0  # RoPE base.
  # "sincos" adds fixed sin/cos features of each token's (t, h, w) index to its patch
  # embedding: RoPE gives only relative offsets, so without it a token cannot tell where
  # in the frame it is (models/dit.py). "none": RoPE only.
  c.dit.position_embedding = "none"
  c.dit.remat = "none"  # Rematerialisation: none | full | dots (save matmul outputs).
  # Attention backend (models/attention.py): einsum (two einsums; fastest on CPU) | xla | cudnn
  # (jax.nn.dot_product_attention) | splash (Pallas TPU kernel) | auto (cpu einsum, gpu cudnn, tpu splash).
  c.dit.attention_impl = "xla"
  # Self-attention across the mesh axes of mesh.rules.length (when > 1): all_gather (K/V) |
  # ring (ppermute K/V blocks, online softmax) | ulysses (all-to-all to heads; heads per shard % axis == 0).
  c.dit.context_parallel = "all_gather"
  # Splash attention tiles (multiples of 128; cut to the sequence length): forward q / kv,
  # dK/dV kernel, dQ kernel.
  c.dit.attention_block_sizes = ConfigDict(
      dict(
          block_q=512, block_kv=512, block_kv_compute=512,
          block_q_dkv=512, block_kv_dkv=512, block_kv_dkv_compute=512,
          block_q_dq=512, block_kv_dq=512,
      )
  )
  c.dit.dtype = "float32"  # Compute dtype: float32 | bfloat16 (params stay float32).
  # n > 1: when every row of a batch splits into n equal blocks that each hold at most one
  # segment (plus padding), the step runs the rows as n x as many rows of L/n tokens and
  # encodes only the captions those blocks use (models/dit.py); other batches take the
  # general path (both are compiled). 0: the general path only. The packer then puts one
  # example at the start of each block when every example fits a block of L/n tokens and
  # K >= n, so every batch is aligned (data/packing.py, `plan_blocks`).
  c.dit.segment_blocks = 0
  # Where the packed batch has slot_tokens (samples of at most half a row), the general
  # path's cross-attention runs per caption slot: each segment's tokens against its own
  # caption only, not against all K x S caption keys of the row (models/dit.py).
  c.dit.per_slot_cross_attention = True
  # Blocks per iteration of the scanned stack (jax.lax.scan unroll): 1 = a loop over the
  # blocks; the depth = no loop (longer compile; XLA sees every block).
  c.dit.scan_unroll = 1

  # ---------------------------------------------------------------- text conditioning
  c.text = ConfigDict()
  c.text.encoder = "bytes"  # bytes (trainable byte-level transformer) | precomputed (embeddings cached by embed-text).
  c.text.max_length = 64  # Text tokens (bytes) per caption.
  c.text.width = 128  # Byte encoder width.
  c.text.depth = 2  # Byte encoder layers.
  c.text.heads = 4  # Byte encoder heads.
  # What the DiT's cross-attention reads from the byte encoder: "bytes" (one key per byte) |
  # "words" (one key per space-separated word, the mean of its bytes, as a word-piece
  # encoder gives: in "a red 3 moves right" the digit is one key of 5, not one of 19).
  c.text.units = "bytes"
  c.text.embed_dim = 0  # Precomputed embedding size (0 = the t5_path encoder's d_model, else read from the cache).
  # Local Hugging Face T5 / UMT5 directory (config.json, *.safetensors, tokenizer.json or spiece.model):
  # `vidsim embed-text` caches its caption embeddings; sampling with encoder=precomputed embeds prompts with it.
  c.text.t5_path = ""
  c.text.t5_dtype = "float32"  # Params and matmuls of that frozen encoder: float32 | bfloat16.
  c.text.embed_batch_size = 32  # Captions per embed-text batch, per process.
  c.text.dropout = 0.1  # Caption dropout probability (learned null embedding, for CFG).

  # ---------------------------------------------------------------- rectified flow
  c.flow = ConfigDict()
  c.flow.logit_normal_mean = 0.0  # Timestep logit-normal location.
  c.flow.logit_normal_std = 1.0  # Timestep logit-normal scale.
  c.flow.shift_base_tokens = 32  # Segment tokens up to which the timestep shift is 1; s = sqrt(n / base) above.
  c.flow.shift_max = 3.0  # Timestep shift cap for the longest sequences (SD3 uses 3 at 16x its base).
  # Conditioning-frame training: probability that a video gets these latent frames clean.
  c.flow.cond_first_frame = 0.1  # First frame (image-to-video).
  c.flow.cond_last_frame = 0.05  # Last frame.
  c.flow.cond_prefix = 0.05  # A prefix (extend forward).
  c.flow.cond_suffix = 0.05  # A suffix (extend backward).
  c.flow.cond_both_ends = 0.05  # Both ends (connect, loop).

  # ---------------------------------------------------------------- DiT training
  c.train = ConfigDict()
  c.train.steps = 1000  # Optimizer steps.
  c.train.row_tokens = 256  # Packed row length in patch tokens.
  c.train.rows_per_batch = 16  # Global packed rows per step (split evenly over processes).
  c.train.max_segments_per_row = 8  # K: most samples packed into one row (text slots per row).
  c.train.grad_accum = 1  # Micro-batches per optimizer step.
  c.train.learning_rate = 3e-4  # Peak learning rate.
  c.train.warmup_steps = 100  # Linear warmup, then cosine decay.
  c.train.end_lr_fraction = 0.1  # Final learning rate as a fraction of the peak.
  c.train.weight_decay = 0.01  # AdamW weight decay.
  c.train.beta2 = 0.99  # AdamW beta2.
  c.train.grad_clip = 1.0  # Global-norm gradient clipping (0 = off).
  c.train.ema_decay = 0.999  # EMA of weights used for sampling (0 = off).
  c.train.log_every = 20  # Steps between metrics lines.
  c.train.checkpoint_every = 200  # Steps between checkpoints.
  c.train.sample_every = 500  # Steps between sample videos (0 = off).
  c.train.sample_prompts = ("a red 3 moves right", "a blue 7 falls")  # Prompts for periodic samples.
  c.train.score_samples = 0  # moving_digits: also generate this many probe prompts and score them (0 = off).
  c.train.eval_every = 500  # Steps between held-out losses (EMA, fixed batches and noise; 0 = off).
  c.train.eval_batches = 2  # Packed batches of each split (eval and train) in that measure.
  c.train.probe_every = 0  # Steps between world probes (vidsim/eval/probes.py, eval.probe_count clips each; 0 = off).
  c.train.max_nonfinite_steps = 5  # Stop after this many consecutive non-finite steps.

  # ---------------------------------------------------------------- checkpoints
  c.checkpoint = ConfigDict()
  c.checkpoint.keep_last = 3  # Keep the newest N checkpoints ...
  c.checkpoint.keep_every = 0  # ... plus every K-th step (0 = none).
  c.checkpoint.async_save = True  # Save in the background while training goes on.

  # ---------------------------------------------------------------- sampling
  c.sample = ConfigDict()
  c.sample.steps = 30  # ODE steps.
  c.sample.sampler = "euler"  # euler | heun.
  c.sample.guidance = 4.0  # Classifier-free guidance scale (1 = off).
  c.sample.frames = 9  # Output frames.
  c.sample.height = 32  # Output height in pixels.
  c.sample.width = 32  # Output width in pixels.
  c.sample.fps = 8.0  # Output frame rate.
  c.sample.window_frames = 0  # Pixel frames per generation window of extend/loop/connect (0 = sample.frames).
  c.sample.overlap_latent_frames = 0  # Latent frames given clean where windows meet (0 = max(1, window // 3)).
  c.sample.edit_strength = 0.6  # Default --strength of edit: SDEdit start time in (0, 1] (1 = ignore the source).
  c.sample.decode_tile_overlap = 0  # Overlap in pixels of tiled-decode tiles (0 = encode.tile_size // 2).

  # ---------------------------------------------------------------- evaluation (`vidsim eval`)
  c.eval = ConfigDict()
  c.eval.what = "vae,loss,probes"  # Default --what of `vidsim eval`.
  c.eval.probe_count = 20  # Generated clips per world probe (t2v: per aspect ratio).
  c.eval.ceiling_count = 100  # True clips per probe for its ceiling and chance.

  # ---------------------------------------------------------------- benchmarks
  # ---------------------------------------------------------------- profiling
  c.profile = ConfigDict()
  # "A,B": a jax profiler trace of train steps A to B (1-based, inclusive) of each stage run,
  # under W/<stage>/profile/ (TensorBoard's profile plugin / XProf). "A": step A alone. "": off.
  c.profile.steps = ""

  c.bench = ConfigDict()
  c.bench.steps = 5  # Timed steps per benchmark (after warmup).
  c.bench.warmup = 2  # Untimed steps (compilation).
  c.bench.segments_per_row = 2  # `vidsim bench dit`: equal video segments in each synthetic row.

  c.lock()
  return c


# ------------------------------------------------------------------ loading


def load_config(path: str, overrides=()) -> ConfigDict:
  """Loads `get_config()` from an experiment file and applies `--config.K=V` overrides.

  Raises UsageError (exit 2) naming the file, the key and the closest valid keys.
  """
  config = _load_file(path)
  for override in overrides:
    key, value = _split_override(override)
    apply_override(config, key, value)
  return config


def _load_file(path: str) -> ConfigDict:
  if not path:
    raise UsageError("--config is required: the path of an experiments/*.py file")
  if not os.path.isfile(path):
    raise UsageError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"vidsim_experiment_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except (AttributeError, KeyError, TypeError) as e:
    # A locked base config raises these when an experiment sets an unknown key.
    raise UsageError(f"{path}: {_describe(e)}") from e
  if not hasattr(module, "get_config"):
    raise UsageError(f"{path} has no get_config() function")
  try:
    config = module.get_config()
  except (AttributeError, KeyError, TypeError) as e:
    raise UsageError(f"{path}: get_config() failed: {_describe(e)}") from e
  if not isinstance(config, ConfigDict):
    raise UsageError(f"{path}: get_config() must return an ml_collections.ConfigDict")
  config.lock()
  return config


def _describe(error):
  return error.args[0] if error.args else repr(error)


def _split_override(arg: str):
  if not arg.startswith("--config."):
    raise UsageError(f"expected --config.KEY=VALUE, got {arg!r}")
  body = arg[len("--config.") :]
  if "=" not in body:
    raise UsageError(f"override {arg!r} has no '=VALUE'")
  key, value = body.split("=", 1)
  return key, value


def all_keys(config: ConfigDict, prefix="") -> list:
  """Every leaf key as a dotted path."""
  keys = []
  for name, value in config.items():
    path = f"{prefix}{name}"
    if isinstance(value, ConfigDict):
      keys.extend(all_keys(value, path + "."))
    else:
      keys.append(path)
  return keys


def closest_keys(config: ConfigDict, key: str, n=3) -> list:
  """The valid keys most like `key`: by the whole path, then by the last part
  (same section first), then the section's own keys."""
  keys = all_keys(config)
  section = key.rsplit(".", 1)[0] + "." if "." in key else ""
  leaf = key.rsplit(".", 1)[-1]
  by_path = difflib.get_close_matches(key, keys, n=n, cutoff=0.6)
  leaves = {k: k.rsplit(".", 1)[-1] for k in keys}
  by_leaf = [k for k in keys if difflib.get_close_matches(leaf, [leaves[k]], cutoff=0.6)]
  by_leaf.sort(key=lambda k: not k.startswith(section))
  in_section = [k for k in keys if section and k.startswith(section)]
  ranked = []
  for k in by_path + by_leaf + in_section:
    if k not in ranked:
      ranked.append(k)
  return ranked[:n]


def apply_override(config: ConfigDict, key: str, raw_value: str):
  """Sets config[key] from a command-line string, parsed by the type of the default."""
  *parents, leaf = key.split(".")
  node = config
  for i, part in enumerate(parents):
    child = node.get(part) if isinstance(node, ConfigDict) else None
    if not isinstance(child, ConfigDict):
      _unknown_key(config, key)
    node = child
  if leaf not in node:
    _unknown_key(config, key)
  current = node[leaf]
  if isinstance(current, ConfigDict):
    raise UsageError(f"config key {key!r} is a section, not a value; its keys: {', '.join(sorted(current.keys()))}")
  value = _parse_value(key, raw_value, current)
  try:
    with node.unlocked():
      node[leaf] = value
  except TypeError as e:
    raise UsageError(f"config key {key!r}: {_describe(e)}") from e


def _unknown_key(config, key):
  close = closest_keys(config, key)
  if close:
    hint = f"; closest valid keys: {', '.join(close)}"
  else:
    hint = f"; top-level keys and sections: {', '.join(config.keys())}"
  raise UsageError(f"unknown config key {key!r}{hint}")


def _parse_value(key, raw, current):
  expected = type(current)
  try:
    if isinstance(current, bool):
      lowered = raw.strip().lower()
      if lowered in ("true", "1", "yes"):
        return True
      if lowered in ("false", "0", "no"):
        return False
      raise ValueError(raw)
    if isinstance(current, int):
      return int(raw)
    if isinstance(current, float):
      return float(raw)
    if isinstance(current, str):
      return raw
    value = ast.literal_eval(raw)
    if isinstance(current, tuple) and isinstance(value, (list, tuple)):
      return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if isinstance(current, tuple) and isinstance(value, str):
      return (value,)
    if current is None or isinstance(value, expected):
      return value
    raise ValueError(raw)
  except (ValueError, SyntaxError) as e:
    raise UsageError(
        f"config key {key!r} expects {expected.__name__} (default {current!r}), got {raw!r}"
    ) from e


def to_json(config: ConfigDict) -> str:
  """The resolved config as JSON (tuples become lists)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def write_config(config: ConfigDict, workdir) -> None:
  """Writes the resolved config to <workdir>/config.json (every run does this)."""
  from etils import epath

  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(to_json(config) + "\n")


def from_json(text: str) -> ConfigDict:
  """Rebuilds a config written by `to_json` on top of the base (for eval/sample of a workdir)."""
  config = base_config()
  _merge(config, json.loads(text), "")
  config.lock()
  return config


def _merge(node: ConfigDict, values: dict, prefix: str):
  for name, value in values.items():
    if name not in node:
      raise UsageError(f"saved config has key {prefix}{name!r} that this vidsim does not know")
    if isinstance(node[name], ConfigDict):
      _merge(node[name], value, f"{prefix}{name}.")
    else:
      if isinstance(node[name], tuple) or isinstance(value, list):
        value = _to_tuple(value)
      node[name] = value


def _to_tuple(value):
  if isinstance(value, list):
    return tuple(_to_tuple(v) for v in value)
  return value

