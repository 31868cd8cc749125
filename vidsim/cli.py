"""The `vidsim` command: one subcommand per stage.

Each subcommand is a function `run_<name>(args, config)` in the module that does the
work; this file only parses arguments, loads the config and maps errors to exit
codes: 0 done, 2 bad usage/config/input (UsageError), 1 anything else; an error class
may name its own code (`exit_code`, e.g. 3: a compiled step does not fit in HBM).
"""

import argparse
import importlib
import sys

from vidsim import config as config_lib
from vidsim import malloc, runtime
from vidsim.tasks import TASKS  # numpy only: keeps `vidsim --help` fast.
from vidsim.errors import StoppedError, UsageError
from vidsim.log import get_logger

log = get_logger()


def _add_config_arg(p, required=True):
  p.add_argument("--config", required=required, help="experiment file, e.g. experiments/digits_demo.py")


def _add_workdir_arg(p, required=True):
  p.add_argument("--workdir", required=required, help="run directory: checkpoints, metrics, samples")


def _config_cmd(sub):
  p = sub.add_parser("config", help="print the resolved config (JSON)")
  _add_config_arg(p)
  return p


def _data_cmd(sub):
  p = sub.add_parser("data", help="build or look at the datasets a config names")
  p.add_argument("action", choices=["prepare", "inspect"])
  _add_config_arg(p)
  p.add_argument("--out", default="", help="inspect: contact sheet PNG path")
  p.add_argument("--split", default="", help="inspect: split to look at (default: the train split)")
  return p


def _train_vae_cmd(sub):
  p = sub.add_parser("train-vae", help="stage 1: train the video VAE")
  _add_config_arg(p)
  _add_workdir_arg(p)
  return p


def _eval_vae_cmd(sub):
  p = sub.add_parser("eval-vae", help="PSNR of the trained VAE over a whole split (every clip once)")
  _add_config_arg(p)
  _add_workdir_arg(p)
  p.add_argument("--split", default="", help="split to evaluate (default: data.eval_split)")
  return p


def _eval_cmd(sub):
  p = sub.add_parser("eval", help="VAE quality, held-out loss and world probes of a workdir -> W/eval/*.json")
  _add_config_arg(p)
  _add_workdir_arg(p)
  p.add_argument("--what", default="", help="comma-separated parts: vae, loss, probes (default: eval.what)")
  p.add_argument("--out-dir", default="", help="where the JSON files go (default: W/eval)")
  return p


def _encode_cmd(sub):
  p = sub.add_parser("encode", help="build the latent cache with the trained VAE (resumable)")
  _add_config_arg(p)
  _add_workdir_arg(p)
  return p


def _embed_text_cmd(sub):
  p = sub.add_parser("embed-text", help="cache caption embeddings of a local T5/UMT5 (text.t5_path) beside the latents")
  _add_config_arg(p)
  _add_workdir_arg(p)
  return p


def _train_cmd(sub):
  p = sub.add_parser("train", help="stage 2: train the DiT on the latent cache")
  _add_config_arg(p)
  _add_workdir_arg(p)
  return p


def _sample_cmd(sub):
  p = sub.add_parser("sample", help="generate videos or images with the trained DiT (every task)")
  _add_config_arg(p)
  _add_workdir_arg(p)
  p.add_argument("--prompt", required=True, help="text prompt")
  p.add_argument("--out", required=True, help="output: .mp4 / .gif / .webm video, or .png for one frame")
  p.add_argument("--task", default="", choices=list(TASKS), help="default: i2v with --image, t2i with --frames 1, else t2v")
  p.add_argument("--frames", type=int, default=None, help="output frames (extend: total length; default sample.frames)")
  p.add_argument("--height", type=int, default=None, help="output height (default sample.height or the input's)")
  p.add_argument("--width", type=int, default=None, help="output width (default sample.width or the input's)")
  p.add_argument("--fps", type=float, default=None, help="output frame rate (default: the input's or sample.fps)")
  p.add_argument("--seed", type=int, default=None, help="noise seed (default: config seed)")
  p.add_argument("--num-samples", type=int, default=1, help="samples per prompt (O_0.mp4, O_1.mp4, ...)")
  p.add_argument("--steps", type=int, default=None, help="ODE steps (default sample.steps)")
  p.add_argument("--sampler", default=None, choices=["euler", "heun"], help="ODE sampler (default sample.sampler)")
  p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = off)")
  p.add_argument("--image", default="", help="i2v: the first frame (PNG/JPEG)")
  p.add_argument("--video", default="", help="extend-forward/-backward, edit: the source; connect: the first clip")
  p.add_argument("--video2", default="", help="connect: the second clip")
  p.add_argument("--strength", type=float, default=None, help="edit: SDEdit start time in (0, 1]")
  return p


def _compile_cmd(sub):
  p = sub.add_parser("compile", help="compile a train step for a TPU topology on this machine: HBM fit, estimated step time")
  _add_config_arg(p)
  p.add_argument("--topology", required=True, help="TPU accelerator type: v4-N, v5p-N, v5e-N / v5litepod-N, v6e-N")
  p.add_argument("--slices", type=int, default=1, help="slices over DCN (default 1)")
  p.add_argument("--stage", default="dit", choices=["dit", "vae"], help="which train step (default dit)")
  p.add_argument("--out", default="", help="JSON report path")
  return p


def _demo_cmd(sub):
  p = sub.add_parser("demo", help="every stage, end to end, on the embedded world")
  p.add_argument("--config", default="", help="experiment file (default: experiments/digits_demo.py)")
  p.add_argument("--workdir", default="runs/demo", help="run directory (default: runs/demo)")
  return p


def _goodput_cmd(sub):
  p = sub.add_parser("goodput", help="where a run's wall time went, across its restarts")
  _add_workdir_arg(p)
  p.add_argument("--json", action="store_true", help="also print the account as JSON")
  return p


def _bench_cmd(sub):
  p = sub.add_parser("bench", help="benchmarks: writes a JSON report")
  p.add_argument("what", help="which benchmark (see docs/benchmarks.md)")
  _add_config_arg(p)
  p.add_argument("--out", default="", help="JSON report path")
  p.add_argument("--peer-seconds", type=float, default=None,
                 help="dit: a peer's step time on this machine; the report adds peer_step_time_s and ratio")
  p.add_argument("--peer", default="", help="compare: the peer script (default $VIDSIM_PEER or ../shared/peers/torch_dit.py)")
  p.add_argument("--peer-python", default="", help="compare: the python that runs it (default $VIDSIM_PEER_PYTHON or python3)")
  p.add_argument("--rounds", type=int, default=3, help="compare: alternations of peer and vidsim")
  return p


# name -> (parser builder, "module:function" run with (args, config)).
COMMANDS = {
    "config": (_config_cmd, "vidsim.cli:run_config"),
    "data": (_data_cmd, "vidsim.data.commands:run_data"),
    "train-vae": (_train_vae_cmd, "vidsim.train.vae_loop:run_train_vae"),
    "eval": (_eval_cmd, "vidsim.eval.command:run_eval"),
    "eval-vae": (_eval_vae_cmd, "vidsim.eval.vae:run_eval_vae"),
    "encode": (_encode_cmd, "vidsim.latents:run_encode"),
    "embed-text": (_embed_text_cmd, "vidsim.embed_text:run_embed_text"),
    "train": (_train_cmd, "vidsim.train.dit_loop:run_train"),
    "sample": (_sample_cmd, "vidsim.sample.command:run_sample"),
    "goodput": (_goodput_cmd, "vidsim.train.goodput:run_goodput"),
    "bench": (_bench_cmd, "vidsim.bench:run_bench"),
    "compile": (_compile_cmd, "vidsim.compile:run_compile"),
    "demo": (_demo_cmd, "vidsim.demo:run_demo"),
}


def build_parser():
  parser = argparse.ArgumentParser(
      prog="vidsim",
      description="Pretrain Sora-style video generation models in JAX. "
      "Config overrides: --config.KEY=VALUE (e.g. --config.dit.depth=4).",
  )
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name in COMMANDS:
    COMMANDS[name][0](sub)
  return parser


def parse(argv):
  """Splits `--config.K=V` overrides off, then parses the rest with argparse."""
  overrides = [a for a in argv if a.startswith("--config.")]
  rest = [a for a in argv if not a.startswith("--config.")]
  parser = build_parser()
  args = parser.parse_args(rest)
  if not args.command:
    parser.print_help()
    raise SystemExit(2)
  return args, overrides


def load_args_config(args, overrides):
  path = getattr(args, "config", "")
  if not path:
    return None
  return config_lib.load_config(path, overrides)


def run_config(args, config):
  print(config_lib.to_json(config))


def entry():
  """The installed `vidsim` command (and `python -m vidsim`): main() in a process
  whose malloc uses huge pages (vidsim/malloc.py). Tests call main() directly."""
  malloc.reexec_with_hugepages()
  sys.exit(main())


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  config = None
  try:
    args, overrides = parse(argv)
    config = load_args_config(args, overrides)
    if overrides and config is None:
      raise UsageError("--config.KEY=VALUE overrides need --config FILE")
    runtime.start(args, config)
    module_name, function_name = COMMANDS[args.command][1].split(":")
    run = getattr(importlib.import_module(module_name), function_name)
    run(args, config)
  except UsageError as e:
    print(f"vidsim: error: {e}", file=sys.stderr)
    return 2
  except StoppedError as e:
    print(f"vidsim: stopped: {e}", file=sys.stderr)
    return 1
  except Exception as e:
    code = getattr(e, "exit_code", None)
    if code is None:
      raise
    print(f"vidsim: error: {e}", file=sys.stderr)  # e.g. vidsim.compile.DoesNotFitError (3).
    return code
  except KeyboardInterrupt:
    print("vidsim: interrupted", file=sys.stderr)
    return 130
  except Exception as e:
    runtime.exit_if_peer_lost(e, config)  # Several processes: names the lost ones and exits.
    raise
  return 0


if __name__ == "__main__":
  sys.exit(main())
