"""How much a compiled program's loops multiply its cost, read from the optimized HLO text.

XLA's `cost_analysis()` counts the body of a `while` loop once, whatever its trip
count. vidsim's models scan their layers (nnx.scan -> while), so a 16-layer DiT's
step reported about 1/16 of its FLOPs and bytes. `loop_factors(hlo_text)` walks the
module's call graph, takes each while loop's trip count from its condition (`i < N`,
as lax.scan writes it), and counts matmul FLOPs (dot / convolution) and the HBM
bytes of top-level instructions (operands + results) twice: each computation once,
as cost_analysis does, and each times its loops' trip counts. The ratios scale the
compiler's own counts; a rough per-instruction formula cancels in a ratio.
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


def _trip_count(attrs, condition, computations):
  """A while loop's trip count: XLA's known_trip_count when it wrote one, else N of a
  condition `counter < N` with a constant N (lax.scan's form, the compare possibly
  inside a fusion); 1 if neither."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
  if known:
    return max(int(known.group(1)), 1)
  if condition is None:
    return 1
  constants = {}
  for name, _, opcode, operands, _ in condition.instructions:
    if opcode == "constant" and re.fullmatch(r"-?\d+", operands.strip()):
      constants[name] = int(operands)

  def is_less_than(opcode, attrs):
    if opcode == "compare":
      return "direction=LT" in attrs
    callee = re.search(r"calls=%([\w.\-]+)", attrs)
    inner = computations.get(callee.group(1)) if opcode == "fusion" and callee else None
    return inner is not None and any(op == "compare" and "direction=LT" in at for _, _, op, _, at in inner.instructions)

  for name, _, opcode, operands, attrs in condition.instructions:
    if is_less_than(opcode, attrs):
      for ref in re.findall(r"%([\w.\-]+)", operands):
        if ref in constants:
          return max(constants[ref], 1)
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


def loop_factors(hlo_text):
  """{"flops": ratio, "bytes": ratio, "loops": [(body, trips)], ...}: the step's matmul FLOPs
  and HBM bytes with loops run their trip counts, over the same counted once per computation."""
  computations, entry = parse(hlo_text)
  if entry is None:
    return {"flops": 1.0, "bytes": 1.0, "loops": []}
  flops = {name: 0.0 for name in computations}
  nbytes = {name: 0.0 for name in computations}
  edges = {name: [] for name in computations}  # caller -> [(callee, trips, moves_bytes)]
  loops = []
  for c in computations.values():
    for name, type_text, opcode, operands, attrs in c.instructions:
      if opcode in ("dot", "convolution"):
        flops[c.name] += _matmul_flops(c, type_text, opcode, operands, attrs)
      called = dict((kind, callee) for kind, callee in _CALLED.findall(attrs))
      if opcode == "while" and "body" in called:
        trips = _trip_count(attrs, computations.get(called.get("condition")), computations)
        loops.append((called["body"], trips))
        edges[c.name] += [(called["body"], trips, True), (called.get("condition"), trips, True)]
      else:
        for kind, callee in called.items():
          # A fusion's inner instructions stay in VMEM: only the fusion's own operands and result move.
          edges[c.name].append((callee, 1, opcode not in ("fusion", "custom-call") and kind != "to_apply"))
      for group in _BRANCHES.findall(attrs):
        edges[c.name] += [(callee.strip().lstrip("%"), 1, True) for callee in group.split(",") if callee.strip()]
      if opcode not in _NO_BYTES:
        refs = re.findall(r"%([\w.\-]+)", operands)
        nbytes[c.name] += _nbytes(type_text) + sum(_nbytes(c.types.get(r, "")) for r in refs)
  totals = {}
  for with_trips in (True, False):
    f = b = 0.0
    stack = [(entry, 1, True)]
    while stack:
      name, times, moves = stack.pop()
      if name not in computations:
        continue
      f += times * flops[name]
      b += times * nbytes[name] if moves else 0.0
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
  }
