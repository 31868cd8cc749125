"""TFDS builders: moving_digits presets and a video_folder with deliberately broken files."""

import json
import os
import threading

import numpy as np
import pytest

import vidsim.data as data_lib
from vidsim.data import builder_for, pipeline, prepare, video_folder, video_io
from vidsim.errors import UsageError


@pytest.fixture
def tiny(tiny_config, tmp_path):
  with tiny_config.unlocked():
    tiny_config.data.data_dir = str(tmp_path / "datasets")
    tiny_config.moving_digits.train_examples = 12
    tiny_config.moving_digits.eval_examples = 4
  return tiny_config


@pytest.mark.parametrize("preset", ["fixed", "mixed", "images", "occlusion"])
def test_moving_digits_presets_build_as_array_record(tiny, preset):
  builder = prepare(tiny, preset)
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": 12, "validation": 4, "test": 4}
  assert any(name.endswith(".array_record-00000-of-00001") or ".array_record" in name
             for name in os.listdir(builder.data_dir))
  source = builder.as_data_source("train")
  examples = [pipeline.decode_example(source[i]) for i in range(len(source))]
  assert sorted(e["example_id"] for e in examples) == list(range(12))
  frames = {e["num_frames"] for e in examples}
  md = tiny.moving_digits
  if preset == "images":
    assert frames == {1}
  elif preset == "fixed":
    assert {e["video"].shape for e in examples} == {(md.frames, md.height, md.width, 3)}
  elif preset == "occlusion":
    assert all(e["metadata"]["occluder"] for e in examples)
    assert all("grey bar" in e["caption"] for e in examples)
  else:
    assert len({e["video"].shape for e in examples}) > 1


def test_prepare_reuses_and_changed_parameters_build_anew(tiny):
  first = prepare(tiny, "fixed")
  stamp = os.path.getmtime(first.data_dir)
  again = prepare(tiny, "fixed")
  assert again.data_dir == first.data_dir and os.path.getmtime(again.data_dir) == stamp
  with tiny.unlocked():
    tiny.moving_digits.seed = 1
  assert builder_for(tiny, "fixed").data_dir != first.data_dir
  assert not builder_for(tiny, "fixed").is_prepared()


def test_readers_build_a_missing_world_and_say_what_they_build(tiny, caplog, capsys):
  with pytest.raises(UsageError, match="vidsim data prepare"):
    pipeline.data_source(tiny, "train", build=False)
  source = pipeline.data_source(tiny, "train")  # What train-vae, encode and eval-vae call.
  builder = builder_for(tiny)
  assert len(source) == 12 and builder.is_prepared()
  name = f"moving_digits/{builder.builder_config.name}"
  assert f"dataset {name} is missing: building it now" in caplog.text
  assert (f"building dataset {name} in {builder.data_dir}: preset mixed, train 12, validation 4, test 4 clips"
          in caplog.text)
  assert f"built dataset {name} in " in caplog.text
  printed = capsys.readouterr()
  for tfds_line in ("Downloading and preparing", "Unknown size", "downloaded and prepared"):
    assert tfds_line not in printed.out + printed.err


def test_other_processes_wait_for_process_0_to_build(tiny, monkeypatch):
  monkeypatch.setattr(data_lib, "_POLL_S", 0.05)
  process_0 = threading.Timer(0.3, prepare, args=(tiny,))
  process_0.start()
  try:
    builder = data_lib.built(tiny, process_index=1)
  finally:
    process_0.join()
  assert builder.is_prepared()
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": 12, "validation": 4, "test": 4}

  # Nobody builds: process 1 gives up after BUILD_WAIT_S, naming the fix, and builds nothing itself.
  monkeypatch.setattr(data_lib, "BUILD_WAIT_S", 0.2)
  with tiny.unlocked():
    tiny.moving_digits.seed = 1
  with pytest.raises(UsageError, match="waited 0.2 s for process 0 .*`vidsim data prepare"):
    data_lib.built(tiny, process_index=1)
  assert not builder_for(tiny).is_prepared()


def _write_folder(folder):
  rng = np.random.default_rng(0)

  def clip(t, h, w):
    return rng.integers(0, 255, (t, h, w, 3), dtype=np.uint8)

  os.makedirs(folder / "sub")
  video_io.write_video(folder / "long.mp4", clip(30, 36, 64), fps=24)  # 30 frames at 24 fps.
  video_io.write_video(folder / "sub" / "phone.webm", clip(6, 64, 36), fps=8)  # Vertical.
  video_io.write_video(folder / "one.mp4", clip(1, 32, 32), fps=8)  # A one-frame video.
  video_io.write_png(folder / "still.png", clip(1, 20, 30)[0])
  (folder / "corrupt.mp4").write_bytes(rng.bytes(4000))
  (folder / "empty.mp4").write_bytes(b"")
  (folder / "readme.mp4").write_text("this is text, not a video")
  (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  good = (folder / "long.mp4").read_bytes()
  (folder / "truncated.mp4").write_bytes(good[: len(good) // 3])
  lines = [
      {"file": "long.mp4", "caption": "static noise"},
      {"file": "sub/phone.webm", "caption": "a tall clip"},
      {"file": "../outside.mp4", "caption": "refused"},
  ]
  (folder / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken json\n")


def _folder_config(tiny, folder):
  with tiny.unlocked():
    tiny.data.builder = "video_folder"
    tiny.video_folder.path = str(folder)
    tiny.video_folder.max_frames = 4
    tiny.video_folder.fps = 8.0
    tiny.video_folder.max_area = 32 * 32
    tiny.video_folder.validation_fraction = 0.0
  return tiny


def test_video_folder_skips_bad_files_with_reasons(tiny, tmp_path):
  folder = tmp_path / "videos"
  _write_folder(folder)
  builder = prepare(_folder_config(tiny, folder))
  report = builder.build_report()
  skipped = {s["file"]: s["reason"] for s in report["skipped"]}
  assert set(skipped) == {"corrupt.mp4", "empty.mp4", "readme.mp4", "broken.png", "truncated.mp4"}
  assert skipped["empty.mp4"] == "empty file"
  assert all(reason for reason in skipped.values())
  assert report["videos"] == 3 and report["images"] == 1
  assert [p["reason"] for p in report["caption_problems"]][0] == "caption path points outside the folder"
  assert json.loads(open(builder.report_path).read()) == report

  # validation_fraction 0 still holds out one file: training needs both splits.
  assert report["clips"]["train"] and report["clips"]["validation"]
  examples = [pipeline.decode_example(source[i])
              for source in (pipeline.data_source(tiny, "train"), pipeline.data_source(tiny, "validation"))
              for i in range(len(source))]
  by_file = {}
  for e in examples:
    by_file.setdefault(e["metadata"]["file"], []).append(e)
  # 30 frames at 24 fps -> 10 at 8 fps -> clips of 4, 4 and a trailing 2 (kept: >= max_frames // 2).
  assert sorted(e["num_frames"] for e in by_file["long.mp4"]) == [2, 4, 4]
  assert all(e["caption"] == "static noise" and e["fps"] == 8.0 for e in by_file["long.mp4"])
  assert all(e["height"] * e["width"] <= 32 * 32 for e in examples)
  long_clip = by_file["long.mp4"][0]["video"]
  assert abs(long_clip.shape[2] / long_clip.shape[1] - 64 / 36) < 0.1  # Native aspect kept.
  phone = by_file["sub/phone.webm"][0]
  assert phone["height"] > phone["width"] and phone["caption"] == "a tall clip"
  assert by_file["one.mp4"][0]["num_frames"] == 1 and by_file["one.mp4"][0]["caption"] == ""
  assert by_file["still.png"][0]["video"].shape == (1, 20, 30, 3)
  assert len({e["example_id"] for e in examples}) == len(examples)

  # A second prepare reuses the build (and its report); a new file builds a new dataset.
  assert prepare(tiny).data_dir == builder.data_dir
  assert prepare(tiny).build_report()["skipped"] == report["skipped"]
  video_io.write_png(folder / "another.png", np.zeros((8, 8, 3), np.uint8))
  assert builder_for(tiny).data_dir != builder.data_dir


def _draw_names(count, below, above=1.0):
  """`count` file names whose split_draw lies in [below, above), found by search."""
  names = (f"img{i}.png" for i in range(10000))
  return [n for n in names if below <= video_folder.split_draw(n) < above][:count]


def test_small_folders_get_both_splits_whatever_the_fraction():
  unlucky = _draw_names(3, 0.0, 0.3)  # By hash alone, all three go to validation at 0.3.
  assert [video_folder.split_of(n, 0.3) for n in unlucky] == ["validation"] * 3
  splits = video_folder.assign_splits(unlucky, 0.3)
  assert len(splits["train"]) == 2 and len(splits["validation"]) == 1
  assert sorted(splits["train"] + splits["validation"]) == sorted(unlucky)
  for fraction in (0.0, 0.01, 0.99, 1.0):
    splits = video_folder.assign_splits(unlucky[:2], fraction)
    assert len(splits["train"]) == len(splits["validation"]) == 1, fraction
  assert video_folder.assign_splits(unlucky[:1], 0.3) == {"train": unlucky[:1], "validation": []}  # Train needs it.
  # A folder whose hash split already has both splits keeps it (built datasets stay reproducible).
  mixed = _draw_names(2, 0.0, 0.3) + _draw_names(3, 0.3)
  splits = video_folder.assign_splits(mixed, 0.3)
  assert splits == {"train": mixed[2:], "validation": mixed[:2]}


def test_a_three_file_folder_builds_train_and_validation(tiny, tmp_path):
  folder = tmp_path / "three"
  folder.mkdir()
  for i, name in enumerate(_draw_names(3, 0.0, 0.3)):
    video_io.write_png(folder / name, np.full((8, 12, 3), 40 * i, np.uint8))
  _folder_config(tiny, folder)
  with tiny.unlocked():
    tiny.video_folder.validation_fraction = 0.3
  with pytest.raises(UsageError, match="vidsim data prepare"):  # Readers never build a folder.
    pipeline.data_source(tiny, "train")
  assert not builder_for(tiny).is_prepared()
  builder = prepare(tiny)
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": 2, "validation": 1}
  assert len(pipeline.data_source(tiny, "train")) == 2


def test_video_folder_needs_an_existing_folder(tiny, tmp_path):
  with pytest.raises(UsageError, match="video_folder.path"):
    builder_for(_folder_config(tiny, tmp_path / "missing"))
