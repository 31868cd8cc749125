"""What every launcher shares: the vidsim command it runs, the topology, usage errors.

The launchers are thin shell scripts that run these Python files with the
interpreter in $PYTHON (default: python3). They import vidsim from this checkout
(the repository root goes first on sys.path), so what they check is what runs.
"""

import os
import shlex
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from vidsim import topology as topology_lib  # noqa: E402
from vidsim.errors import UsageError  # noqa: E402

USAGE_EXIT = 2


class LaunchUsage(Exception):
  """Bad launcher input: print the message (and usage) and exit 2, before anything is created."""


def split_command(argv):
  """(launcher args, command after `--`)."""
  if "--" in argv:
    i = argv.index("--")
    return argv[:i], argv[i + 1:]
  return argv, []


def vidsim_command(command):
  """Checks that `command` is a vidsim command; returns its arguments after the program name.

  Accepted: `vidsim SUB ...` and `python[3] -m vidsim SUB ...`, SUB one of the vidsim
  subcommands. Anything else is refused: launchers run exactly one program, everywhere.
  """
  if not command:
    raise LaunchUsage("no command: give one after `--`, e.g. -- vidsim train --config F --workdir W")
  args = list(command)
  if os.path.basename(args[0]) == "vidsim":
    args = args[1:]
  elif len(args) >= 3 and os.path.basename(args[0]).startswith("python") and args[1:3] == ["-m", "vidsim"]:
    args = args[3:]
  else:
    raise LaunchUsage(f"not a vidsim command: {shlex.join(command)!r}; the launchers run `vidsim COMMAND ...` only")
  from vidsim import cli  # The subcommands vidsim itself knows.

  known = list(cli.COMMANDS)
  if not args or args[0] not in known:
    got = args[0] if args else "(none)"
    raise LaunchUsage(f"unknown vidsim command {got!r}; known: {', '.join(known)}")
  return args


def option(args, name, default=""):
  """The value of `--name V` or `--name=V` in a vidsim argument list."""
  for i, a in enumerate(args):
    if a == name and i + 1 < len(args):
      return args[i + 1]
    if a.startswith(name + "="):
      return a[len(name) + 1:]
  return default


def with_dcn(args, slices):
  """Multi-slice: the DCN mesh axis over the slices (data parallel across slices), unless
  the command sets mesh.dcn itself."""
  if slices <= 1 or any(a.startswith("--config.mesh.dcn.") for a in args):
    return list(args)
  return [*args, f"--config.mesh.dcn.data={slices}"]


def topology(name, slices=1):
  """vidsim.topology.parse, with an unknown name as a LaunchUsage listing the known ones."""
  try:
    return topology_lib.parse(name, slices)
  except UsageError as e:
    raise LaunchUsage(str(e)) from None


def fail_usage(parser, message):
  parser.print_usage(sys.stderr)
  print(f"{parser.prog}: error: {message}", file=sys.stderr)
  return USAGE_EXIT


def remote_command(args, python="python3", env=None, cwd=None):
  """One shell line that runs `python -m vidsim ARGS` with `env`, in `cwd`."""
  parts = []
  if cwd:
    parts.append(f"cd {cwd} &&")
  for key, value in (env or {}).items():
    parts.append(f"{key}={shlex.quote(str(value))}")
  parts.append(shlex.join([python, "-m", "vidsim", *args]))
  return " ".join(parts)
