"""The shared training loop on a toy regression: resume, metrics, non-finite steps."""

import json
import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vidsim import config as config_lib
from vidsim import mesh as mesh_lib
from vidsim.errors import UsageError
from vidsim.train import goodput, loop, optim, stage
from vidsim.train.metrics import read_metrics


def _config(steps=8, **train):
  c = config_lib.base_config()
  with c.unlocked():
    c.mesh.ici.update(dict(data=4, fsdp=2))
    c.train.steps = steps
    c.train.log_every = 2
    c.train.checkpoint_every = 4
    c.train.learning_rate = 0.3
    c.train.warmup_steps = 1
    c.peak_flops_per_device = 1e9  # Skip the matmul measurement in tests.
    c.train.update(train)
  return c


def _dataset(nan_at=()):
  w_true = np.arange(4, dtype=np.float32)

  def make(i):
    rng = np.random.default_rng(i)
    x = rng.normal(size=(4,)).astype(np.float32)
    y = np.float32(x @ w_true)
    if i // 8 in nan_at:
      y = np.float32("nan")
    return {"x": x, "y": y, "index": np.int64(i)}

  return grain.MapDataset.range(10_000).map(make).batch(8).to_iter_dataset()


def _spec(config, mesh, nan_at=(), seen=None):
  model_cfg = config.train
  with mesh_lib.activate(mesh, config):
    model = nnx.Linear(4, 1, kernel_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed", None)), rngs=nnx.Rngs(0))
  graphdef, params, _, param_shardings = mesh_lib.split_model(model, mesh, config)
  optimizer = optim.make_optimizer(model_cfg)

  def init_state():
    return optim.init_train_state(params, optimizer, config.seed)

  def train_step(state, batch):
    def loss_fn(p):
      pred = nnx.merge(graphdef, p)(batch["x"])[:, 0]
      noise = 0.01 * jax.random.normal(optim.step_rng(state), pred.shape)
      return jnp.mean((pred + noise - batch["y"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    state, stats = optim.apply_gradients(state, loss, grads, optimizer, model_cfg.ema_decay)
    return state, dict(loss=loss, **stats)

  state_shardings = stage.state_shardings(jax.eval_shape(init_state), params, param_shardings, mesh)
  data_iter = iter(_dataset(nan_at))

  def to_global(b):
    if seen is not None:
      seen.extend(int(i) for i in b["index"])
    return mesh_lib.make_global_batch({"x": b["x"], "y": b["y"]}, mesh, config)

  return loop.StageSpec(
      name="toy", steps=model_cfg.steps, log_every=model_cfg.log_every,
      checkpoint_every=model_cfg.checkpoint_every, max_nonfinite_steps=model_cfg.max_nonfinite_steps,
      init_state=init_state, state_shardings=state_shardings, train_step=train_step,
      data_iter=data_iter, to_global=to_global,
      batch_cost=lambda b: (6.0 * 4 * len(b["x"]), {"examples": len(b["x"])}),
  )


def _params(state):
  return np.asarray(jax.device_get(jax.tree.leaves(state["params"])[0]))


def test_trains_logs_and_checkpoints(tmp_path):
  config = _config()
  mesh = mesh_lib.make_mesh(config)
  state = loop.run(_spec(config, mesh), config, tmp_path, mesh)
  rows = read_metrics(tmp_path / "toy" / "metrics.jsonl")
  assert [r["step"] for r in rows] == [2, 4, 6, 8]
  assert rows[-1]["loss"] < rows[0]["loss"]
  for key in ("step_time_s", "examples_per_s", "mfu", "grad_norm", "flops_per_step"):
    assert key in rows[-1]
  assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 8
  assert sorted(p.name for p in (tmp_path / "toy" / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]
  assert int(state["step"]) == 8


def test_resume_is_bit_exact_and_sees_the_same_batches(tmp_path):
  config = _config()
  mesh = mesh_lib.make_mesh(config)
  seen_straight, seen_resumed = [], []
  straight = loop.run(_spec(config, mesh, seen=seen_straight), config, tmp_path / "a", mesh)

  # SIGTERM at step 4: the loop saves at that step boundary and returns, as on preemption.
  interrupted = _spec(config, mesh, seen=seen_resumed)
  interrupted.every.append((4, lambda state, step: os.kill(os.getpid(), signal.SIGTERM)))
  stopped = loop.run(interrupted, config, tmp_path / "b", mesh)
  assert int(stopped["step"]) == 4
  resumed = loop.run(_spec(config, mesh, seen=seen_resumed), config, tmp_path / "b", mesh)
  np.testing.assert_array_equal(_params(straight), _params(resumed))
  assert seen_straight == seen_resumed
  rows = read_metrics(tmp_path / "b" / "toy" / "metrics.jsonl")
  assert [r["step"] for r in rows] == [2, 4, 6, 8]


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
  config = _config(steps=8, max_nonfinite_steps=3)
  mesh = mesh_lib.make_mesh(config)
  # Batch 2 (the third step) is poisoned once: skipped, params unchanged, counted.
  state = loop.run(_spec(config, mesh, nan_at=(2,)), config, tmp_path / "one", mesh)
  assert int(state["nonfinite_total"]) == 1
  assert np.all(np.isfinite(_params(state)))
  rows = read_metrics(tmp_path / "one" / "toy" / "metrics.jsonl")
  assert rows[-1]["nonfinite_total"] == 1

  with pytest.raises(loop.NonFiniteError, match="3 non-finite steps in a row at step 7"):
    loop.run(_spec(config, mesh, nan_at=(4, 5, 6)), config, tmp_path / "many", mesh)
  # The last good checkpoint (step 4) is intact and loadable.
  ckpts = sorted(int(p.name) for p in (tmp_path / "many" / "toy" / "checkpoints").iterdir() if p.name.isdigit())
  assert ckpts == [4]


def test_a_relative_workdir_works(tmp_path, monkeypatch):
  """Users type `--workdir runs/x`; Orbax needs absolute paths, the loop must not care."""
  monkeypatch.chdir(tmp_path)
  config = _config(steps=4)
  mesh = mesh_lib.make_mesh(config)
  loop.run(_spec(config, mesh), config, "runs/relative", mesh)
  assert (tmp_path / "runs" / "relative" / "toy" / "checkpoints" / "4").is_dir()


def test_ema_warmup_forgets_the_initial_weights():
  decay = lambda step: float(optim.ema_warmup_decay(0.999, step))
  assert decay(0) == pytest.approx(0.1) and decay(90) == pytest.approx(0.91) and decay(10_000) == pytest.approx(0.999)
  # Weight left on the initial params after 500 updates: a plain 0.999 EMA keeps 61% of it.
  assert np.prod([decay(s) for s in range(500)]) < 1e-6
  params = {"w": jnp.zeros(())}
  optimizer = optax.sgd(1.0)
  state = optim.init_train_state(params, optimizer, 0)
  for _ in range(3):  # Gradient -1: params go 1, 2, 3.
    state, _ = optim.apply_gradients(state, jnp.float32(0), {"w": jnp.float32(-1)}, optimizer, 0.999)
  expected = 0.0
  for step, value in enumerate((1.0, 2.0, 3.0)):
    expected = decay(step) * expected + (1 - decay(step)) * value
  assert float(state["ema"]["w"]) == pytest.approx(expected)


def test_a_timestep_range_without_tokens_is_left_out_of_the_logged_row():
  state = {"nonfinite_total": np.int32(0)}
  metrics = {"loss": np.float32(1.0), "loss_t00_25": np.float32(0.0), "tokens_t00_25": np.float32(0.0),
             "loss_t25_50": np.float32(0.8), "tokens_t25_50": np.float32(12.0)}
  row = loop._log_row(metrics, state, loop._Window(), peak=1.0)
  assert "loss_t00_25" not in row and row["tokens_t00_25"] == 0
  assert row["loss_t25_50"] == pytest.approx(0.8)


def test_hook_time_is_not_step_time(tmp_path):
  import time

  config = _config(steps=8, checkpoint_every=100)
  mesh = mesh_lib.make_mesh(config)
  spec = _spec(config, mesh)
  # A slow hook at steps 2 and 6: the logged step times (windows 2-4 and 6-8) must not include it.
  spec.every = [(2, lambda state, step: time.sleep(1.0) if step in (2, 6) else None)]
  loop.run(spec, config, tmp_path, mesh)
  rows = read_metrics(tmp_path / "toy" / "metrics.jsonl")
  assert [r["step"] for r in rows] == [2, 4, 6, 8]
  assert rows[1]["step_time_s"] < 0.3 and rows[3]["step_time_s"] < 0.3, rows


def test_goodput_counts_every_attempt_and_the_steps_a_restart_redid(tmp_path):
  config = _config()
  mesh = mesh_lib.make_mesh(config)
  interrupted = _spec(config, mesh)
  interrupted.every.append((4, lambda state, step: os.kill(os.getpid(), signal.SIGTERM)))
  loop.run(interrupted, config, tmp_path, mesh)
  loop.run(_spec(config, mesh), config, tmp_path, mesh)
  account = goodput.account(tmp_path / "toy")
  assert [(a["resume_step"], a["step"], a["done"]) for a in account["attempts"]] == [(0, 4, True), (4, 8, True)]
  assert account["seconds"]["lost"] == 0  # The preempted attempt saved its last step.
  assert account["seconds"]["compile"] > 0 and account["seconds"]["steps"] > 0
  assert 0 < account["goodput"] < 1

  # An attempt killed at step 10 whose last checkpoint was step 6: the next one redid 4 of its 10 steps.
  stage = tmp_path / "killed"
  stage.mkdir()
  seconds = dict.fromkeys(goodput.PHASES, 1.0) | {"steps": 10.0}
  lines = [dict(attempt="a", start=0.0, time=20.0, resume_step=0, step=10, done=False, seconds=seconds),
           dict(attempt="b", start=25.0, time=40.0, resume_step=6, step=12, done=True, seconds=seconds)]
  (stage / goodput.FILE).write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"attempt": "c", "st')
  account = goodput.account(stage)
  first, second = account["attempts"]
  assert first["redone_steps"] == 4 and first["seconds"]["lost"] == pytest.approx(4.0)
  assert first["seconds"]["unrecorded"] == pytest.approx(5.0)  # From its last snapshot to the restart.
  assert second["redone_steps"] == 0 and account["wall_s"] == pytest.approx(40.0)
  assert account["goodput"] == pytest.approx((6.0 + 10.0) / 40.0)
  assert "redone by the next attempt" in goodput.format_account({"dit": account})


def test_profile_steps_write_a_trace(tmp_path):
  config = _config(steps=4)
  with config.unlocked():
    config.profile.steps = "2,3"
  mesh = mesh_lib.make_mesh(config)
  loop.run(_spec(config, mesh), config, tmp_path, mesh)
  traces = list((tmp_path / "toy" / "profile").rglob("*.xplane.pb"))
  assert traces and all(t.stat().st_size > 0 for t in traces)


@pytest.mark.parametrize("text,bounds", [("", None), ("10,15", (10, 15)), ("7", (7, 7))])
def test_profile_steps_parse(text, bounds):
  config = _config()
  with config.unlocked():
    config.profile.steps = text
  assert loop.profile_steps(config) == bounds


@pytest.mark.parametrize("text", ["15,10", "0,3", "a,b", "1,2,3"])
def test_profile_steps_refuse_bad_ranges(text):
  config = _config()
  with config.unlocked():
    config.profile.steps = text
  with pytest.raises(UsageError, match="profile.steps"):
    loop.profile_steps(config)
