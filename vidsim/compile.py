"""`vidsim compile --config F --topology v5p-64 [--slices 2] [--stage dit|vae] [--out R.json]`.

Compiles a stage's real train step for a TPU topology on this machine, without a TPU
and without allocating anything, the way MaxText's train_compile does: libtpu gives
compile-only devices for the topology (`jax.experimental.topologies.get_topology_desc`),
the config's mesh is built on them (vidsim.mesh.make_mesh; several slices become the
hybrid ICI x DCN mesh), and `jit(step).lower(abstract state, abstract batch).compile()`
runs XLA:TPU's whole pipeline, memory assignment included. The report:

- per-chip HBM from `compiled.memory_analysis()` (arguments, outputs, temporaries,
  generated code, aliased) against the chip's HBM, and the headroom;
- vidsim's model FLOPs per step (vidsim/models/flops.py, the count MFU is quoted
  against in training) and the compiler's `cost_analysis()` FLOPs and bytes;
- an estimated step time: a roofline bound max(FLOPs / peak, bytes / HBM bandwidth)
  per chip from the compiler's counts, plus, for Pallas attention kernels (which
  cost_analysis cannot see into), the kernels' own FLOPs and bytes at the same
  rates. It is a lower bound on the step time, not a measurement: collectives,
  kernel efficiency and host input are not in it. The MFU and tokens/s it implies
  are therefore upper bounds.

A step that does not fit is exit code 3 with the largest buffers and what would help;
bad usage is 2 (unknown topology, a mesh that does not divide the chips, no libtpu).
libtpu is imported here only: training and tests on CPU never load it.
"""

import dataclasses
import importlib.util
import json
import math
import os
import re
import tempfile
import time

import jax
import numpy as np
from etils import epath

from vidsim import hlo_cost
from vidsim import machine
from vidsim import mesh as mesh_lib
from vidsim import topology as topology_lib
from vidsim.errors import UsageError
from vidsim.log import get_logger
from vidsim.models import dit as dit_lib
from vidsim.models import flops as flops_lib
from vidsim.models import vae as vae_lib
from vidsim.train import dit_step
from vidsim.train.checkpoint import abstract_like
from vidsim.train.stage import assemble

log = get_logger("compile")

GIB = 1024**3
# Exit code of a step that compiles but does not fit in HBM: not bad usage (2), not a
# crash (1); launch scripts can tell "change the config" from "something broke".
DOES_NOT_FIT = 3


class DoesNotFitError(Exception):
  """The train step needs more HBM per chip than the topology's chips have."""

  exit_code = DOES_NOT_FIT

  def __init__(self, message, report=None):
    super().__init__(message)
    self.report = report


# ------------------------------------------------------------------ devices


LIBTPU_SETS = ("CLOUD_TPU_TASK_ID", "CLOUD_TPU_ACCELERATOR_TYPE", "TPU_PREMAPPED_BUFFER_SIZE")


def compile_only_devices(topology):
  """The topology's chips as compile-only TPU devices (slice_index set across slices)."""
  if importlib.util.find_spec("libtpu") is None:
    raise UsageError('vidsim compile needs libtpu for TPU compiles: pip install -e ".[tpu]"')
  from jax.experimental import topologies

  # Off a TPU VM, libtpu's initialisation asks the GCE metadata server what this host
  # is and prints warnings when nobody answers; these say it (unless already set, as on
  # a TPU VM). The compile target is get_topology_desc's arguments, not these. A compile
  # uses no TPU, so it need not hold libtpu's one-process-per-host lock either: two
  # compiles (or a compile beside a test run) may run at once.
  quiet = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": topology.accelerator_type,
           "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  added = [name for name in quiet if name not in os.environ]
  os.environ.update({name: quiet[name] for name in added})
  try:  # libtpu reads them once, at initialisation; the rest of the process must not see them.
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology.topology_name,
        chip_config_name=topology.generation.chip_config,
        chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=topology.slices,
    )
  finally:
    for name in added:
      os.environ.pop(name, None)
    # libtpu also sets these in the C environment (os.environ does not see them), and a
    # child process would inherit them: CLOUD_TPU_TASK_ID makes init_distributed (and
    # jax) take the machine for a TPU pod host.
    for name in LIBTPU_SETS:
      if name not in os.environ:
        os.unsetenv(name)
  devices = list(desc.devices)
  if len(devices) != topology.total_chips:
    raise RuntimeError(f"libtpu gave {len(devices)} devices for {topology.name} x {topology.slices}, "
                       f"expected {topology.total_chips}")
  return devices


# ------------------------------------------------------------------ the stage's program


@dataclasses.dataclass
class StageProgram:
  """What compile needs of a stage: its step and abstract arguments (with shardings)."""

  train_step: object  # (state, batch) -> (state, metrics)
  state: object  # pytree of jax.ShapeDtypeStruct with NamedShardings
  batch: dict  # name -> jax.ShapeDtypeStruct with NamedSharding
  model_flops: float  # vidsim's model FLOPs of one step (the whole job)
  kernel_flops: float  # of that, FLOPs inside Pallas kernels (invisible to cost_analysis)
  kernel_bytes: float  # HBM bytes those kernels move (estimate, see attention_kernel_cost)
  units: dict  # what one step processes: {"tokens": n} or {"frames": n}
  describe: dict  # shapes of the step, for the report


def stage_program(config, mesh, stage: str) -> StageProgram:
  """The trainers' own stage assembly (vidsim/train/stage.py: model, optimizer, state
  shardings, step), here with abstract arrays. Call under mesh_lib.activate(mesh, config)."""
  assembled = assemble(config, mesh, stage)
  state = abstract_like(jax.eval_shape(assembled.init_state), assembled.state_shardings)
  step = assembled.train_step
  batch_shapes, costs = (_dit_batch(config, mesh) if stage == "dit" else _vae_batch(config))
  if stage == "dit":
    dit_step.check_rows_per_batch(config, mesh)  # As the trainer checks it.
  else:
    _check_clips_divide(config, mesh)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=mesh_lib.batch_sharding(mesh, config, len(shape)))
           for k, (shape, dtype) in batch_shapes.items()}
  return StageProgram(step, state, batch, **costs)


def _check_clips_divide(config, mesh):
  """Exit 2 when the VAE bench batch (data.batch_size clips) does not split over the mesh's
  data-parallel devices: name the key and a size that would."""
  clips, shards = config.data.batch_size, mesh_lib.data_parallel_size(mesh, config)
  if clips % shards:
    raise UsageError(
        f"data.batch_size={clips} must be a multiple of {shards}: the data-parallel size of mesh "
        f"{mesh_lib.describe(mesh)} (data x fsdp); use data.batch_size={-(-clips // shards) * shards} or a mesh "
        f"whose data x fsdp divides it")


def _dit_batch(config, mesh):
  """Shapes of one global packed batch (vidsim/data/packing.py's layout) and its cost."""
  tc, text = config.train, config.text
  rows, length, k, s = tc.rows_per_batch, tc.row_tokens, tc.max_segments_per_row, text.max_length
  shapes = {
      "tokens": ((rows, length, dit_lib.patch_features(config)), np.float32),
      "positions": ((rows, length, 3), np.int32),
      "segment_ids": ((rows, length), np.int32),
      "segment_frames": ((rows, k), np.int32),
      "text_mask": ((rows, k, s), np.bool_),
  }
  if text.encoder == "precomputed":
    if not text.embed_dim:
      raise UsageError("text.encoder=precomputed: set text.embed_dim for vidsim compile (training reads it from the cache)")
    shapes["text_embeddings"] = ((rows, k, s, text.embed_dim), np.float32)
  else:
    shapes["text_tokens"] = ((rows, k, s), np.int32)
  terms = flops_lib.dit_flops_breakdown(config, rows, length, k * s, k)
  model_flops = 3 * sum(terms.values())
  length_axes = dict(mesh_lib.logical_rules(config)).get("length") or ()
  length_axes = (length_axes,) if isinstance(length_axes, str) else length_axes
  split_rows = math.prod(mesh.shape[a] for a in length_axes) > 1
  ring = split_rows and config.dit.get("context_parallel", "") == "ring"
  kernel_flops, kernel_bytes = attention_kernel_cost(config, terms, rows, length, k * s, ring_self_attention=ring)
  return shapes, dict(
      model_flops=model_flops, kernel_flops=kernel_flops, kernel_bytes=kernel_bytes,
      units={"tokens": rows * length},
      describe={"rows": rows, "row_tokens": length, "text_slots_per_row": k, "text_tokens_per_slot": s,
                "grad_accum": tc.grad_accum, "params": flops_lib.dit_param_count(config)},
  )


def _vae_batch(config):
  """The VAE bench's batch: data.batch_size clips of the largest bucket."""
  frames, height, width = max(config.data.buckets, key=lambda b: b[0] * b[1] * b[2])
  clips = config.data.batch_size
  flops = vae_lib.vae_flops(config, frames, height, width, train=True) * clips
  return {"video": ((clips, frames, height, width, 3), np.float32)}, dict(
      model_flops=flops, kernel_flops=0.0, kernel_bytes=0.0, units={"frames": clips * frames},
      describe={"clips": clips, "clip_shape": [frames, height, width]},
  )


def uses_pallas_attention(config) -> bool:
  return config.dit.get("attention_impl", "") == "splash"


def attention_kernel_cost(config, terms, rows, length, text_slots, ring_self_attention=False):
  """(FLOPs, HBM bytes) of one train step's attention when it runs in Pallas kernels.

  FLOPs: vidsim's attention terms (self, cross, text encoder; forward x 3 for the
  train step) over the full square of every row. That is the kernel's work however
  the row is packed: splash skips only the blocks its static mask rules out (here a
  full mask), and segment ids mask elements inside every block it visits. The
  kernels' backward recomputes the logits, and dit.remat=full reruns the forward:
  more work than counted, so the bound stays a lower bound. Bytes: a flash-style
  kernel streams K and V once per query block (block_q tokens), so forward +
  backward move about 3 x rows x heads x (L / block_q) x keys x 2 x head_dim elements.
  With ring context parallelism self-attention runs as XLA einsums over K/V blocks
  (vidsim.models.attention.ring_attention): the compiler counts it, so it is left out.
  """
  if not uses_pallas_attention(config):
    return 0.0, 0.0
  kernel_terms = [n for n in terms if n.endswith("attn") and not (ring_self_attention and n == "blocks/self_attn")]
  flops = 3 * sum(terms[n] for n in kernel_terms)
  d = config.dit
  head_dim = d.width // d.heads
  itemsize = 2 if d.dtype == "bfloat16" else 4
  block_q = _block_q(config, length)
  per_pass = lambda keys: rows * d.heads * math.ceil(length / block_q) * keys * 2 * head_dim * itemsize
  nbytes = 3 * d.depth * ((0 if ring_self_attention else per_pass(length)) + per_pass(text_slots))
  return float(flops), float(nbytes)


def _block_q(config, length):
  sizes = config.dit.get("attention_block_sizes", None)
  value = None
  if sizes is not None:
    value = sizes.get("block_q") if hasattr(sizes, "get") else (sizes[0] if len(sizes) else None)
  return min(int(value or 512), length)


# ------------------------------------------------------------------ compile and report


def compile_stage(config, topology, stage="dit"):
  """Compiles the stage's train step for the topology. Returns the report dict; raises
  DoesNotFitError (with the report) when the step needs more HBM than a chip has."""
  devices = compile_only_devices(topology)
  mesh = mesh_lib.make_mesh(config, devices)
  started = time.perf_counter()
  with mesh_lib.activate(mesh, config), tempfile.TemporaryDirectory(prefix="vidsim-compile-") as dump:
    program = stage_program(config, mesh, stage)
    jitted = jax.jit(program.train_step, out_shardings=(jax.tree.map(lambda x: x.sharding, program.state), None),
                     donate_argnums=0)
    lowered = jitted.lower(program.state, program.batch)
    lower_s = time.perf_counter() - started
    try:
      # The dump's memory-usage report (buffer assignment) is written even when the
      # compile runs out of HBM, whose error names only the total: it names the buffers.
      compiled = lowered.compile(compiler_options={"xla_dump_to": dump, "xla_dump_hlo_pass_re": "^$"})
      error = None
    except Exception as e:  # XLA reports an OOM as a JaxRuntimeError (RESOURCE_EXHAUSTED).
      if "RESOURCE_EXHAUSTED" not in str(e) and "memory" not in str(e).lower():
        raise
      compiled, error = None, str(e)
    compile_s = time.perf_counter() - started
    buffers = largest_buffers(dump)
  report = _report(config, topology, mesh, stage, program, compiled, lower_s, compile_s)
  report["largest_buffers"] = buffers
  if error is not None:
    report["oom"] = _parse_oom(error)
  if error is not None or report["hbm"]["total_bytes"] > report["hbm"]["capacity_bytes"]:
    raise DoesNotFitError(_does_not_fit_message(report, config, mesh, stage), report)
  return report


def _report(config, topology, mesh, stage, program, compiled, lower_s, compile_s):
  g = topology.generation
  chips = topology.total_chips
  report = {
      "stage": stage,
      "topology": topology.as_dict(),
      "chips": chips,
      "hosts": topology.total_hosts,
      "mesh": dict(mesh.shape),
      "device_kind": mesh.devices.flat[0].device_kind,
      **program.describe,
      "dtype": config.dit.dtype if stage == "dit" else config.vae.dtype,
      "remat": config.dit.remat if stage == "dit" else "none",
      "attention_impl": config.dit.get("attention_impl", "") if stage == "dit" else "",
      "model_flops_per_step": program.model_flops,
      "model_flops_per_step_per_chip": program.model_flops / chips,
      "machine": {"cpu": machine.cpu_model(), "cores": machine.cores(), "jax": jax.__version__, "libtpu": _libtpu_version()},
      "lower_s": round(lower_s, 2),
      "compile_s": round(compile_s, 2),
  }
  if compiled is None:
    return report
  memory = compiled.memory_analysis()
  parts = {
      "arguments_bytes": memory.argument_size_in_bytes,
      "outputs_bytes": memory.output_size_in_bytes,
      "temporaries_bytes": memory.temp_size_in_bytes,
      "generated_code_bytes": memory.generated_code_size_in_bytes,
      "aliased_bytes": memory.alias_size_in_bytes,
  }
  # Donated state: outputs reuse the arguments' buffers (aliased), counted once.
  total = sum(v for k, v in parts.items() if k != "aliased_bytes") - parts["aliased_bytes"]
  report["hbm"] = {
      **parts, "total_bytes": total, "capacity_bytes": g.hbm_bytes,
      "headroom_fraction": 1.0 - total / g.hbm_bytes,
  }
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  loops = hlo_cost.loop_factors(compiled.as_text())
  report["compiler_cost_per_chip"] = {
      "flops": flops, "bytes_accessed": nbytes,  # As cost_analysis() says: each loop body once.
      "loop_flops_factor": loops["flops"], "loop_bytes_factor": loops["bytes"],
      "loops": [{"body": body, "trips": trips} for body, trips in loops["loops"]],
      "flops_with_loops": flops * loops["flops"], "bytes_with_loops": nbytes * loops["bytes"],
      "collective_bytes": loops["collective_bytes"],
  }
  report["estimate"] = estimate(report["compiler_cost_per_chip"], program, topology)
  return report


def estimate(cost, program, topology):
  """Roofline lower bound on the step time per chip (every chip does 1/chips of the work:
  the compiled SPMD program is one chip's share), and the MFU and throughput it implies."""
  g = topology.generation
  chips = topology.total_chips
  compute_s, memory_s = cost["flops_with_loops"] / g.peak_bf16_flops, cost["bytes_with_loops"] / g.hbm_bytes_per_s
  xla_s = max(compute_s, memory_s)
  kernel_flops, kernel_bytes = program.kernel_flops / chips, program.kernel_bytes / chips
  kernel_s = max(kernel_flops / g.peak_bf16_flops, kernel_bytes / g.hbm_bytes_per_s)
  step_s = xla_s + kernel_s
  sent = sum(cost.get("collective_bytes", {}).values())
  out = {
      "method": (
          "roofline lower bound per chip: max(compiler FLOPs / peak bf16 FLOP/s, compiler bytes / HBM bytes/s), "
          "the compiler's counts scaled for loop trip counts (vidsim/hlo_cost.py)"
          + (" + Pallas attention kernels' max(FLOPs / peak, bytes / HBM bandwidth) from vidsim's attention count"
             if kernel_flops else "")
          + "; collectives, kernel efficiency and input are not modelled: a bound, not a measurement"
      ),
      "peak_bf16_flops_per_chip": g.peak_bf16_flops,
      "hbm_bandwidth_per_chip": g.hbm_bytes_per_s,
      "xla_compute_s": compute_s,
      "xla_memory_s": memory_s,
      "kernel_flops_per_chip": kernel_flops,
      "kernel_bytes_per_chip": kernel_bytes,
      "kernel_s": kernel_s,
      "step_time_s": step_s,
      # Not in the bound: XLA overlaps collectives with compute where it can.
      "collective_bytes_per_chip": sent,
      "collectives_s_if_not_overlapped": sent / g.ici_bytes_per_s,
      "bound_by": "memory" if memory_s > compute_s else "compute",
  }
  if step_s > 0:
    out["mfu"] = program.model_flops / chips / step_s / g.peak_bf16_flops
    for name, count in program.units.items():
      out[f"{name}_per_s_per_chip"] = count / chips / step_s
  return out


# ------------------------------------------------------------------ does not fit

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"


def _bytes(number, unit):
  return float(number) * _UNITS[unit.upper()]


def _parse_oom(text):
  """The figures of XLA:TPU's out-of-memory error: what it needs and what a chip has."""
  out = {"message": text.strip().splitlines()[0][:500]}
  needed = re.search(r"required for HLO temporaries \(" + _SIZE + r"\) exceeds available HBM \(" + _SIZE, text)
  used = re.search(r"Used " + _SIZE + r" of " + _SIZE + r" hbm", text)
  for match in (needed, used):
    if match:
      out["needed_bytes"] = _bytes(*match.group(1, 2))
      out["available_bytes"] = _bytes(*match.group(3, 4))
  return out


def largest_buffers(dump_dir, count=8):
  """The largest HBM allocations of the partitioned program (one chip's), from XLA's
  memory-usage report in an HLO dump: size, the shapes that share it, and the jax
  operation that made the largest of them (from the optimized HLO's metadata)."""
  dump = epath.Path(dump_dir)
  reports = sorted(dump.glob("*memory-usage-report.txt"))
  if not reports:
    return []
  text = reports[-1].read_text()
  hbm = text.split("Memory Space:")[1] if "Memory Space:" in text else text
  rows = []
  for line in hbm.splitlines():
    parts = [p.strip() for p in line.split(";")]
    if len(parts) != 5 or not re.match(r"[\d.]+\w*B", parts[1]):
      continue
    size = re.match(_SIZE, parts[1])
    rows.append({"bytes": _bytes(*size.group(1, 2)), "values": int(parts[3]), "shapes": parts[4]})
  rows.sort(key=lambda r: -r["bytes"])
  rows = rows[:count]
  hlo_files = sorted(dump.glob(reports[-1].name.replace("-memory-usage-report.txt", ".txt")))
  hlo = hlo_files[-1].read_text() if hlo_files else ""
  for row in rows:
    row["made_by"] = _made_by(hlo, row["shapes"])
  return rows


def _made_by(hlo, shapes):
  """op_name of the first computing instruction whose result has the largest listed shape."""
  listed = [s.split("×")[-1].strip() for s in shapes.split(", ")]
  elements = lambda s: math.prod(int(d) for d in re.findall(r"\d+", s.split("[", 1)[1])) if "[" in s else 0
  for shape in sorted(listed, key=elements, reverse=True)[:1]:
    pattern = re.compile(r"= " + re.escape(shape) + r"\{[^\n]*?metadata=\{op_name=\"([^\"]+)\"")
    for match in pattern.finditer(hlo):
      return match.group(1)[:200]
  return ""


def _does_not_fit_message(report, config, mesh, stage):
  oom = report.get("oom", {})
  capacity = report["topology"]["hbm_bytes_per_chip"]
  need = oom.get("needed_bytes") or report.get("hbm", {}).get("total_bytes")
  lines = [f"{stage} train step does not fit {report['topology']['name']}"
           + (f" x {report['topology']['slices']} slices" if report["topology"]["slices"] > 1 else "")
           + f": needs {_gib(need)} of HBM per chip, a {report['device_kind']} chip has {_gib(capacity)}"
           + f" (mesh {mesh_lib.describe(mesh)})"]
  if oom:
    lines.append(f"XLA: {oom['message']}")
  buffers = report.get("largest_buffers", [])
  if buffers:
    lines.append("largest buffers per chip (XLA buffer assignment; a buffer may be shared by several values):")
    for b in buffers[:6]:
      lines.append(f"  {_gib(b['bytes']):>10}  {b['shapes'][:150]}" + (f"  <- {b['made_by']}" if b["made_by"] else ""))
    length = report.get("row_tokens")
    if length and any(re.search(rf",{length},{length}\]", b["shapes"]) for b in buffers[:6]):
      lines.append(f"  ([..., {length}, {length}] buffers are attention scores over whole rows; under a layer scan's "
                   "dynamic_update_slice they are kept for the backward pass, one per layer)")
  if "hbm" in report:
    h = report["hbm"]
    lines.append("per chip: " + ", ".join(f"{k[:-6]} {_gib(v)}" for k, v in h.items() if k.endswith("_bytes")
                                          and k not in ("total_bytes", "capacity_bytes")))
  lines.append("what would help: " + "; ".join(_advice(config, mesh, stage)))
  return "\n".join(lines)


def _advice(config, mesh, stage):
  shape = dict(mesh.shape)
  tips = []
  if stage == "dit":
    if config.dit.remat != "full":
      tips.append(f"--config.dit.remat={'full' if config.dit.remat == 'dots' else 'dots'} (now {config.dit.remat!r}: "
                  "recompute activations in the backward pass)")
    if config.dit.dtype != "bfloat16":
      tips.append("--config.dit.dtype=bfloat16 (half the activations)")
    tips.append(f"fewer rows per step: --config.train.rows_per_batch (now {config.train.rows_per_batch}) or "
                f"--config.train.grad_accum > 1 (now {config.train.grad_accum}; one micro-batch lives at a time)")
    if not uses_pallas_attention(config):
      tips.append("--config.dit.attention_impl=splash (no [L, L] logits or bias in HBM)")
    tips.append(f"context parallelism: --config.mesh.ici.sequence > 1 (now {shape['sequence']}) splits each row's tokens")
  else:
    tips.append(f"fewer clips per step: --config.data.batch_size (now {config.data.batch_size})")
  tips.append(f"shard the weights and optimizer over more chips: --config.mesh.ici.fsdp (now {shape['fsdp']}) "
              "with data=-1")
  return tips


def _gib(n):
  if n is None:
    return "?"
  return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.1f} MiB"


def _ms(seconds):
  return f"{1e3 * seconds:.1f} ms" if seconds >= 1e-3 else f"{1e6 * seconds:.0f} us"


def _count(n):
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


# ------------------------------------------------------------------ text and CLI


def format_report(r) -> str:
  t = r["topology"]
  lines = [
      f"vidsim compile: {r['stage']} train step for {t['name']}"
      + (f" x {t['slices']} slices" if t["slices"] > 1 else "")
      + f" ({t['topology_name']}, {r['device_kind']})",
      f"  chips {r['chips']} ({t['chips_per_slice']} per slice), hosts {r['hosts']}, "
      f"mesh {', '.join(f'{k}={v}' for k, v in r['mesh'].items())}",
  ]
  if r["stage"] == "dit":
    lines.append(f"  step: {r['rows']} rows x {r['row_tokens']} tokens, {_count(r['params'])} params, "
                 f"{r['dtype']}, remat {r['remat']}, attention {r['attention_impl']}")
  else:
    lines.append(f"  step: {r['clips']} clips of {'x'.join(map(str, r['clip_shape']))}, {r['dtype']}")
  h = r.get("hbm")
  if h:
    lines.append(f"  HBM per chip: {_gib(h['total_bytes'])} of {_gib(h['capacity_bytes'])} "
                 f"({100 * h['headroom_fraction']:.1f}% headroom)")
    lines.append(f"    arguments {_gib(h['arguments_bytes'])}, outputs {_gib(h['outputs_bytes'])}, "
                 f"temporaries {_gib(h['temporaries_bytes'])}, generated code {_gib(h['generated_code_bytes'])}, "
                 f"aliased {_gib(h['aliased_bytes'])} (donated state, counted once)")
  lines.append(f"  model FLOPs per step: {r['model_flops_per_step']:.4g} ({r['model_flops_per_step_per_chip']:.4g} per chip)")
  c, e = r.get("compiler_cost_per_chip"), r.get("estimate")
  if c and e:
    lines.append(f"  compiler cost per chip: {c['flops_with_loops']:.4g} FLOPs, {c['bytes_with_loops']:.4g} bytes "
                 f"(cost_analysis {c['flops']:.4g} / {c['bytes_accessed']:.4g}, loop bodies counted once, "
                 f"x {c['loop_flops_factor']:.2f} / x {c['loop_bytes_factor']:.2f} for {len(c['loops'])} loops)")
    if e["kernel_flops_per_chip"]:
      lines.append(f"  Pallas attention kernels per chip (not in the compiler's cost): {e['kernel_flops_per_chip']:.4g} "
                   f"FLOPs, {e['kernel_bytes_per_chip']:.4g} bytes, {_ms(e['kernel_s'])}")
    rate = "; ".join(f"{v:,.0f} {k[:-len('_per_s_per_chip')]}/s/chip" for k, v in e.items() if k.endswith("_per_s_per_chip"))
    lines.append(f"  estimated step time >= {_ms(e['step_time_s'])} ({e['bound_by']}-bound XLA part), "
                 f"MFU <= {100 * e.get('mfu', 0):.1f}%, {rate}")
    if e.get("collective_bytes_per_chip"):
      kinds = ", ".join(f"{k} {_gib(v)}" for k, v in sorted(c["collective_bytes"].items(), key=lambda kv: -kv[1]))
      lines.append(f"  collectives per chip: {_gib(e['collective_bytes_per_chip'])} ({kinds}); "
                   f"{_ms(e['collectives_s_if_not_overlapped'])} at the chip's ICI bandwidth if not overlapped")
    lines.append(f"  ({e['method']})")
  m = r["machine"]
  lines.append(f"  compiled in {r['compile_s']:.1f} s on {m['cpu']} ({m['cores']} cores)")
  return "\n".join(lines)


def run_compile(args, config):
  topology = topology_lib.parse(args.topology, args.slices)
  if args.stage not in ("dit", "vae"):
    raise UsageError(f"--stage {args.stage!r}: choose dit or vae")
  try:
    report = compile_stage(config, topology, args.stage)
  except DoesNotFitError as e:
    if args.out and e.report is not None:
      _write(args.out, {**e.report, "fits": False, "error": str(e)})
    raise
  report["fits"] = True
  print(format_report(report))
  if args.out:
    _write(args.out, report)
  return report


def _write(path, report):
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  epath.Path(path).write_text(json.dumps(report, indent=2, default=float) + "\n")


def _libtpu_version():
  try:
    from importlib.metadata import version

    return version("libtpu")
  except Exception:
    return ""
