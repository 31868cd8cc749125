"""`vidsim data prepare|inspect` through the CLI, and the data benchmark."""

import numpy as np
from PIL import Image

from vidsim import cli


def _args(repo_root, data_dir, *extra):
  return ["--config", str(repo_root / "experiments" / "digits_tiny.py"), f"--config.data.data_dir={data_dir}",
          "--config.moving_digits.train_examples=10", "--config.moving_digits.eval_examples=4", *extra]


def test_prepare_then_inspect_writes_a_contact_sheet(repo_root, tmp_path, capsys):
  data_dir = tmp_path / "datasets"
  assert cli.main(["data", "prepare", *_args(repo_root, data_dir, "--config.data.builder_config=all")]) == 0
  out = capsys.readouterr().out
  for preset in ("fixed", "mixed", "images", "occlusion"):
    assert f"moving_digits/{preset}-" in out and "train 10, validation 4, test 4 (built in" in out
  assert cli.main(["data", "prepare", *_args(repo_root, data_dir)]) == 0
  assert "(reused)" in capsys.readouterr().out

  sheet = tmp_path / "sheet.png"
  assert cli.main(["data", "inspect", *_args(repo_root, data_dir, "--out", str(sheet), "--split", "validation")]) == 0
  out = capsys.readouterr().out
  assert "split validation: 4 clips" in out and "(frames, height, width): clips" in out and "fps: 8: 4" in out
  image = np.asarray(Image.open(sheet))
  assert image.ndim == 3 and image.shape[0] > 64 and image.max() > 0


def test_inspect_before_prepare_is_a_usage_error(repo_root, tmp_path, capsys):
  assert cli.main(["data", "inspect", *_args(repo_root, tmp_path / "none")]) == 2
  assert "vidsim data prepare" in capsys.readouterr().err


def test_video_folder_without_path_is_a_usage_error(repo_root, tmp_path, capsys):
  assert cli.main(["data", "prepare", *_args(repo_root, tmp_path, "--config.data.builder=video_folder")]) == 2
  assert "video_folder.path" in capsys.readouterr().err


def test_bench_data_reports_clips_per_second(tiny_config, tmp_path):
  from vidsim.data.bench import bench_data

  with tiny_config.unlocked():
    tiny_config.data.data_dir = str(tmp_path)
    tiny_config.moving_digits.train_examples = 16
    tiny_config.bench.steps = 2
    tiny_config.bench.warmup = 1
  report = bench_data(tiny_config, worker_counts=(0,))
  (run,) = report["runs"]
  assert run["workers"] == 0 and run["batches"] == 2 and run["clips"] > 0
  assert run["clips_per_s"] > 0 and run["seconds_per_batch"] > 0
