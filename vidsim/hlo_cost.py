"""How much a compiled program's loops multiply its cost, and what its collectives move,
read from the optimized HLO text.

XLA's `cost_analysis()` counts the body of a `while` loop once, whatever its trip
count. vidsim's models scan their layers (nnx.scan -> while), so a 16-layer DiT's
step reported about 1/16 of its FLOPs and bytes. `loop_factors(hlo_text)` walks the
module's call graph, takes each while loop's trip count from its condition (`i < N`,
as lax.scan writes it), and counts matmul FLOPs (dot / convolution) and the HBM
bytes of top-level instructions (operands + results) twice: each computation once,
as cost_analysis does, and each times its loops' trip counts. The ratios scale the
compiler's own counts; a rough per-instruction formula cancels in a ratio. The bytes
each chip sends in collectives (all-gather, reduce-scatter, all-reduce, all-to-all,
collective-permute), loops included, are summed per kind.
"""

import math
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition)=%([\w.\-]+)")
_BRANCHES = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
# Top-level instructions that move no HBM bytes of their own.
_NO_BYTES = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
             "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency"}


def _split_type(rest):
  """'f32[2,3]{1,0} fusion(%a, %b), kind=...' -> ('f32[2,3]{1,0}', 'fusion', '%a, %b', attrs)."""
  if rest.startswith("("):  # A tuple type: up to its matching parenthesis.
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        break
    type_text, rest = rest[: i + 1], rest[i + 1 :].lstrip()
  else:
    type_text, _, rest = rest.partition(" ")
  opcode, _, rest = rest.partition("(")
  depth, end = 1, len(rest)
  for i, ch in enumerate(rest):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      end = i
      break
  return type_text, opcode.strip(), rest[:end], rest[end + 1 :]


def _arrays(type_text):
  return [(dtype, [int(d) for d in dims.split(",") if d]) for dtype, dims in _ARRAY.findall(type_text)]


def _nbytes(type_text):
  return sum(_DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in _arrays(type_text))


class _Computation:
  def __init__(self, name):
    self.name = name
    self.types = {}  # instruction name -> its result type text
    self.instructions = []  # (name, type, opcode, operands, attrs)


def parse(hlo_text):
  """{name: _Computation} and the entry computation's name."""
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = computations.setdefault(header.group(1), _Computation(header.group(1)))
      if line.startswith("ENTRY"):
        entry = current.name
      continue
    if line.strip() == "}":
      current = None
      continue
    match = _INSTRUCTION.match(line) if current is not None else None
    if match:
      type_text, opcode, operands, attrs = _split_type(match.group(2))
      current.types[match.group(1)] = type_text
      current.instructions.append((match.group(1), type_text, opcode, operands, attrs))
  return computations, entry


def _trip_count(attrs, condition, body, computations):
  """A while loop's trip count: XLA's known_trip_count when it wrote one, else from a
  condition `counter < N` with a constant N (lax.scan's form; the compare possibly inside
  a fusion) and the body's `counter + step` (XLA's windowed einsums step by 2); 1 if
  neither can be read."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
  if known:
    return max(int(known.group(1)), 1)
  if condition is None:
    return 1
  init_step = re.search(r'"known_init_step":\{"init":"(-?\d+)","step":"(\d+)"\}', attrs)
  init, step = (int(init_step.group(1)), int(init_step.group(2))) if init_step else (0, None)

  def constants(computation):
    return {name: int(ops) for name, _, op, ops, _ in computation.instructions
            if op == "constant" and re.fullmatch(r"-?\d+", ops.strip())}

  def tuple_index(computation, ref):
    for name, _, op, _, at in computation.instructions:
      if name == ref and op == "get-tuple-element":
        index = re.search(r"index=(\d+)", at)
        return int(index.group(1)) if index else None
    return None

  def is_less_than(opcode, attrs):
    if opcode == "compare":
      return "direction=LT" in attrs
    callee = re.search(r"calls=%([\w.\-]+)", attrs)
    inner = computations.get(callee.group(1)) if opcode == "fusion" and callee else None
    return inner is not None and any(op == "compare" and "direction=LT" in at for _, _, op, _, at in inner.instructions)

  limits = constants(condition)
  for _, _, opcode, operands, attrs_ in condition.instructions:
    if not is_less_than(opcode, attrs_):
      continue
    refs = _refs(operands)
    bound = next((limits[r] for r in refs if r in limits), None)
    if bound is None:
      continue
    counter = next((tuple_index(condition, r) for r in refs if r not in limits), None)
    if step is None:
      step = _counter_step(body, counter) if body is not None and counter is not None else 1
    return max(-(-(bound - init) // max(step, 1)), 1)
  return 1


def _counter_step(body, index):
  """c of the body's `counter + c` for the counter at tuple index `index` (1 if not found)."""
  root = body.instructions[-1] if body.instructions else None
  if root is None or root[2] != "tuple":
    return 1
  refs = _refs(root[3])
  if index >= len(refs):
    return 1
  constants = {name: int(ops) for name, _, op, ops, _ in body.instructions
               if op == "constant" and re.fullmatch(r"-?\d+", ops.strip())}
  for name, _, op, ops, _ in body.instructions:
    if name == refs[index] and op == "add":
      return next((constants[r] for r in _refs(ops) if r in constants), 1)
  return 1


def _matmul_flops(computation, type_text, opcode, operands, attrs):
  """2 x output elements x contracted elements of a dot or convolution."""
  refs = re.findall(r"%([\w.\-]+)", operands)
  out = _arrays(type_text)
  if len(refs) < 2 or not out:
    return 0.0
  lhs, rhs = (_arrays(computation.types.get(r, "")) for r in refs[:2])
  if not lhs or not rhs:
    return 0.0
  out_elements = math.prod(out[0][1])
  if opcode == "dot":
    dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
    contracted = math.prod(lhs[0][1][int(d)] for d in dims.group(1).split(",") if d) if dims else 1
  else:
    # convolution: input features x the window's taps that land on data. TPU HLO writes a
    # batched matmul as a convolution whose window spans the batch with lhs_dilate equal
    # to it, so only one tap of each such window is real.
    labels = re.search(r"dim_labels=(\w+?)_(\w+?)->", attrs)
    if not labels or "i" not in labels.group(2):
      return 0.0
    contracted = rhs[0][1][labels.group(2).index("i")]
    window = re.search(r"window=\{([^}]*)\}", attrs)
    field = lambda key: [int(x) for x in re.search(key + r"=([\dx]+)", window.group(1)).group(1).split("x")] \
        if window and re.search(key + r"=([\dx]+)", window.group(1)) else []
    sizes, dilation = field(r"\bsize"), field(r"lhs_dilate")
    lhs_labels, lhs_dims = labels.group(1), lhs[0][1]
    for d, size in enumerate(sizes):
      # Taps that land on data: no more than the (dilated) input, and one per dilation step.
      step = dilation[d] if d < len(dilation) else 1
      n = lhs_dims[lhs_labels.index(str(d))] if str(d) in lhs_labels else size
      contracted *= max(1, min(size, (n - 1) * step + 1) // step)
    groups = re.search(r"batch_group_count=(\d+)", attrs)
    if groups and "b" in labels.group(1):  # Weight gradients: the batch is contracted, in groups.
      contracted *= lhs[0][1][labels.group(1).index("b")] // int(groups.group(1))
  return 2.0 * out_elements * contracted


def _refs(operands):
  return re.findall(r"%([\w.\-]+)", operands)


def _instruction_bytes(c, type_text, opcode, operands, attrs, computations):
  """HBM bytes a top-level instruction reads and writes. Slices of a big buffer move only
  the slice: a layer scan reads layer i of its stacked weights with a dynamic-slice and
  writes its saved activations into a stacked buffer in place (dynamic-update-slice),
  and counting those buffers whole would count every layer's share every iteration."""
  refs = _refs(operands)
  size = lambda ref: _nbytes(c.types.get(ref, ""))
  if opcode == "dynamic-slice":
    return 2 * _nbytes(type_text)
  if opcode == "dynamic-update-slice":
    return 2 * size(refs[1]) if len(refs) > 1 else _nbytes(type_text)
  callee = re.search(r"calls=%([\w.\-]+)", attrs)
  fused = computations.get(callee.group(1)) if opcode == "fusion" and callee else None
  if fused is None:
    return _nbytes(type_text) + sum(size(r) for r in refs)
  params = {}  # fused parameter name -> operand index
  for name, _, op, ops, _ in fused.instructions:
    if op == "parameter" and re.fullmatch(r"\d+", ops.strip()):
      params[name] = int(ops)
  users = {name: [] for name in params}  # parameter -> [(opcode, operand position, result type, operands)]
  for name, t, op, ops, _ in fused.instructions:
    for position, ref in enumerate(_refs(ops)):
      if ref in users:
        users[ref].append((op, position, t, ops))
  root = fused.instructions[-1] if fused.instructions else None
  in_place, written = set(), None
  if root is not None:
    roots = [root] if root[2] != "tuple" else [i for i in fused.instructions if i[0] in _refs(root[3])]
    dus = [i for i in roots if i[2] == "dynamic-update-slice"]
    if dus:
      written = sum(_nbytes(fused.types.get(_refs(i[3])[1], "")) for i in dus if len(_refs(i[3])) > 1)
      written += sum(_nbytes(i[1]) for i in roots if i[2] != "dynamic-update-slice")
      in_place = {_refs(i[3])[0] for i in dus}
  total = _nbytes(type_text) if written is None else written
  for name, index in params.items():
    if index >= len(refs) or name in in_place:
      continue
    uses = users[name]
    if uses and all(op == "dynamic-slice" and position == 0 for op, position, _, _ in uses):
      total += sum(_nbytes(t) for _, _, t, _ in uses)
    else:
      total += size(refs[index])
  return total


def loop_factors(hlo_text):
  """{"flops": ratio, "bytes": ratio, "loops": [(body, trips)], ...}: the step's matmul FLOPs
  and HBM bytes with loops run their trip counts, over the same counted once per computation."""
  computations, entry = parse(hlo_text)
  if entry is None:
    return {"flops": 1.0, "bytes": 1.0, "loops": []}
  flops = {name: 0.0 for name in computations}
  nbytes = {name: 0.0 for name in computations}
  edges = {name: [] for name in computations}  # caller -> [(callee, trips, moves_bytes)]
  comm = {name: {} for name in computations}  # collective kind -> bytes
  loops = []
  for c in computations.values():
    for name, type_text, opcode, operands, attrs in c.instructions:
      if opcode in ("dot", "convolution"):
        flops[c.name] += _matmul_flops(c, type_text, opcode, operands, attrs)
      if opcode in _COLLECTIVES:
        kind = opcode.replace("-start", "")
        comm[c.name][kind] = comm[c.name].get(kind, 0.0) + _collective_bytes(c, kind, type_text, operands)
      called = dict((kind, callee) for kind, callee in _CALLED.findall(attrs))
      if opcode == "while" and "body" in called:
        trips = _trip_count(attrs, computations.get(called.get("condition")), computations.get(called["body"]),
                            computations)
        loops.append((called["body"], trips))
        edges[c.name] += [(called["body"], trips, True), (called.get("condition"), trips, True)]
      else:
        for kind, callee in called.items():
          # A fusion's inner instructions stay in VMEM: only the fusion's own operands and result move.
          edges[c.name].append((callee, 1, opcode not in ("fusion", "custom-call") and kind != "to_apply"))
      for group in _BRANCHES.findall(attrs):
        edges[c.name] += [(callee.strip().lstrip("%"), 1, True) for callee in group.split(",") if callee.strip()]
      if opcode not in _NO_BYTES:
        nbytes[c.name] += _instruction_bytes(c, type_text, opcode, operands, attrs, computations)
  totals = {}
  collectives = {}
  for with_trips in (True, False):
    f = b = 0.0
    stack = [(entry, 1, True)]
    while stack:
      name, times, moves = stack.pop()
      if name not in computations:
        continue
      f += times * flops[name]
      b += times * nbytes[name] if moves else 0.0
      if with_trips:
        for kind, value in comm[name].items():
          collectives[kind] = collectives.get(kind, 0.0) + times * value
      for callee, trips, callee_moves in edges[name]:
        stack.append((callee, times * (trips if with_trips else 1), moves and callee_moves))
    totals[with_trips] = (f, b)
  (f_all, b_all), (f_once, b_once) = totals[True], totals[False]
  return {
      "flops": f_all / f_once if f_once else 1.0,
      "bytes": b_all / b_once if b_once else 1.0,
      "loops": loops,
      "matmul_flops": f_all,
      "bytes_accessed": b_all,
      "collective_bytes": collectives,
  }


# Async collectives are counted at their -start; the -done moves nothing new.
_COLLECTIVES = {"all-gather", "all-gather-start", "all-reduce", "all-reduce-start", "reduce-scatter",
                "all-to-all", "collective-permute", "collective-permute-start", "ragged-all-to-all"}


def _collective_bytes(c, kind, type_text, operands):
  """Bytes one chip sends for a collective, roughly: an all-gather's result, an
  all-reduce twice its operand (reduce-scatter + all-gather), otherwise its operand."""
  arrays = [_DTYPE_BYTES[d] * math.prod(dims) for d, dims in _arrays(type_text)]
  operand = sum(_nbytes(c.types.get(r, "")) for r in _refs(operands))
  if kind == "all-gather":
    return max(arrays, default=0.0)
  if kind == "all-reduce":
    return 2.0 * operand
  return operand
