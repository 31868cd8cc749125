"""`vidsim demo` stage order: a training stage stopped early (SIGTERM) ends the demo
instead of sampling from a half-trained model. Stages are replaced by stand-ins."""

import argparse
import os

import numpy as np
import pytest

from vidsim import config as config_lib
from vidsim import demo, report
from vidsim.data import commands as data_commands
from vidsim.train import dit_loop, vae_loop
from vidsim import latents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("dit_steps_done, samples_expected", [(4, True), (2, False)])
def test_demo_samples_only_after_full_training(tmp_path, monkeypatch, dit_steps_done, samples_expected):
  config = config_lib.load_config(os.path.join(ROOT, "experiments", "digits_tiny.py"))
  assert config.train.steps == 4
  called = []
  monkeypatch.setattr(data_commands, "prepare", lambda c: called.append("data"))
  monkeypatch.setattr(vae_loop, "train_vae", lambda c, w, m: called.append("vae") or {"step": np.int32(c.vae_train.steps)})
  monkeypatch.setattr(latents, "encode_cache", lambda c, w, m: called.append("encode"))
  monkeypatch.setattr(dit_loop, "train_dit", lambda c, w, m: called.append("dit") or {"step": np.int32(dit_steps_done)})
  monkeypatch.setattr(demo, "demo_samples", lambda c, w, m: called.append("sample") or [])
  monkeypatch.setattr(demo, "demo_probe", lambda c, w, m: called.append("score") or (None, []))
  monkeypatch.setattr(report, "write_report", lambda *a, **k: called.append("report"))
  demo.run_demo(argparse.Namespace(workdir=str(tmp_path)), config)
  full = ["data", "vae", "encode", "dit", "sample", "score", "report"]
  assert called == (full if samples_expected else full[:4])
