"""Where a training run's wall time went, across all its restarts: `vidsim goodput --workdir W`.

Each start of a stage (an "attempt") appends snapshots to W/<stage>/goodput.jsonl
(process 0 only): the attempt's start time, the step it resumed from, the step it has
reached, and the seconds spent so far in each phase:
  startup     process start (or the end of the stage before it in the same process)
              -> the loop (imports, mesh, data and model set-up)
  restore     checkpoint restore, or initialising a fresh state
  compile     the first step of the attempt (compilation, and that one step)
  data        waiting for the next batch and putting it on the devices
  steps       training steps
  checkpoint  checkpoint saves (the part the loop waits for) and the final commit
  hooks       periodic samples and evaluations
A snapshot is written at every log and checkpoint step and at the end, so a process
that dies loses at most one log interval of accounting ("unrecorded" below: the time
from its last snapshot to the next attempt's start, when that is known). "other" is
the rest of an attempt's wall time (bookkeeping between the phases).

The account: productive time is the step time of the steps that survived; steps an
attempt made after its last checkpoint are redone by the next attempt, and their time
counts as "lost". Goodput = productive / wall.

Google's ml-goodput-measurement library does this for TPU jobs but records through
Cloud Logging, which a local or offline run cannot reach; this file keeps the same
categories in a file beside the checkpoints.
"""

import contextlib
import json
import os
import time
import uuid

from etils import epath

from vidsim.errors import UsageError
from vidsim.log import is_chief

FILE = "goodput.jsonl"
PHASES = ("startup", "restore", "compile", "data", "steps", "checkpoint", "hooks")
STAGES = ("vae", "dit")


def process_start_time() -> float:
  """This process's start (Unix seconds), from /proc; the import of this module elsewhere."""
  try:
    with open("/proc/self/stat") as f:
      ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
      boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError, StopIteration):
    return _IMPORTED


_IMPORTED = time.time()
# When the last stage run by this process ended: `vidsim demo` runs several stages in one
# process, and a later stage's start-up begins there, not at the process start.
_last_stage_end = None


class Recorder:
  """Seconds per phase for one attempt of one stage, snapshotted to goodput.jsonl."""

  def __init__(self, stage_dir, resume_step: int):
    self.path = epath.Path(stage_dir) / FILE
    self.attempt = uuid.uuid4().hex[:12]
    self.start = _last_stage_end or process_start_time()
    self.resume_step = resume_step
    self.seconds = dict.fromkeys(PHASES, 0.0)
    self.seconds["startup"] = max(time.time() - self.start, 0.0)

  @contextlib.contextmanager
  def phase(self, name: str):
    begin = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[name] += time.perf_counter() - begin

  def iteration(self):
    """A mark at the start of a loop iteration, for `end_iteration`."""
    return time.perf_counter(), self._other()

  def end_iteration(self, mark) -> None:
    """What the iteration took beyond its timed phases is step time."""
    begin, other = mark
    self.seconds["steps"] += max(time.perf_counter() - begin - (self._other() - other), 0.0)

  def _other(self) -> float:
    return sum(v for k, v in self.seconds.items() if k not in ("steps", "startup"))

  def snapshot(self, step: int, done: bool = False) -> None:
    global _last_stage_end
    if done:
      _last_stage_end = time.time()
    if not is_chief():
      return
    line = {"attempt": self.attempt, "start": self.start, "time": time.time(), "resume_step": self.resume_step,
            "step": step, "done": done, "seconds": {k: round(v, 4) for k, v in self.seconds.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(line) + "\n")


def _attempts(path) -> list:
  """The last snapshot of every attempt in a goodput.jsonl, in start order."""
  last = {}
  for line in epath.Path(path).read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue  # A line cut short by a killed process.
    last[row["attempt"]] = row
  return sorted(last.values(), key=lambda r: r["start"])


def account(stage_dir) -> dict:
  """The wall-time account of a stage over all its attempts (see the module docstring)."""
  attempts = _attempts(epath.Path(stage_dir) / FILE)
  totals = dict.fromkeys(PHASES + ("lost", "unrecorded", "other"), 0.0)
  rows = []
  for i, row in enumerate(attempts):
    seconds = dict(row["seconds"])
    following = attempts[i + 1] if i + 1 < len(attempts) else None
    made = max(row["step"] - row["resume_step"], 0)
    # Steps past the step the next attempt resumed from were made again there.
    redone = min(max(row["step"] - following["resume_step"], 0), made) if following else 0
    lost = seconds["steps"] * redone / made if made else 0.0
    seconds["steps"] -= lost
    seconds["lost"] = lost
    wall = row["time"] - row["start"]
    seconds["unrecorded"] = max(following["start"] - row["time"], 0.0) if following and not row["done"] else 0.0
    # Loop bookkeeping (metrics, logging) and set-up between the phases.
    seconds["other"] = max(wall - sum(seconds[k] for k in PHASES + ("lost",)), 0.0)
    for key in totals:
      totals[key] += seconds.get(key, 0.0)
    rows.append({"attempt": row["attempt"], "resume_step": row["resume_step"], "step": row["step"],
                 "done": row["done"], "wall_s": wall + seconds["unrecorded"], "redone_steps": redone,
                 "seconds": seconds})
  wall = sum(r["wall_s"] for r in rows)
  return {"attempts": rows, "wall_s": wall, "seconds": totals,
          "goodput": totals["steps"] / wall if wall > 0 else 0.0}


def workdir_account(workdir) -> dict:
  """{stage: account} for every stage of a workdir that recorded one."""
  return {stage: account(epath.Path(workdir) / stage) for stage in STAGES
          if (epath.Path(workdir) / stage / FILE).exists()}


def format_account(accounts: dict) -> str:
  lines = []
  for stage, acc in accounts.items():
    n = len(acc["attempts"])
    lines.append(f"{stage}: {acc['wall_s']:.1f} s wall over {n} attempt{'s' if n != 1 else ''}, "
                 f"goodput {100 * acc['goodput']:.1f}% (productive step time / wall)")
    for key, seconds in acc["seconds"].items():
      share = 100 * seconds / acc["wall_s"] if acc["wall_s"] else 0.0
      lines.append(f"  {key:<11} {seconds:10.1f} s {share:6.1f}%")
    for row in acc["attempts"]:
      lines.append(f"  attempt {row['attempt']}: steps {row['resume_step']} -> {row['step']}"
                   + (f" ({row['redone_steps']} redone by the next attempt)" if row["redone_steps"] else "")
                   + ("" if row["done"] else " (ended without a final snapshot)"))
  return "\n".join(lines)


def run_goodput(args, config):
  accounts = workdir_account(args.workdir)
  if not accounts:
    raise UsageError(f"no {FILE} under {args.workdir}/{{{','.join(STAGES)}}}: run `vidsim train-vae` or "
                     "`vidsim train` with this workdir first")
  print(format_account(accounts))
  if args.json:
    print(json.dumps(accounts, indent=2))
