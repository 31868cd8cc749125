"""W/report.html: every task card with its prompt and media, curves, metrics, measured summary."""

import html
import json

import numpy as np

from vidsim import config as config_lib
from vidsim import report
from vidsim.data.video_io import write_video


def test_report_shows_every_output_curves_and_measured_summary(tmp_path):
  config = config_lib.base_config()
  (tmp_path / "vae" / "recon").mkdir(parents=True)
  (tmp_path / "dit").mkdir()
  (tmp_path / "vae" / "metrics.jsonl").write_text(
      "".join(json.dumps({"step": s, "loss": 1.0 / s, "psnr": 15 + s}) + "\n" for s in (10, 20)))
  (tmp_path / "vae" / "recon" / "val_psnr.jsonl").write_text('{"step": 20, "val_psnr": 21.9}\n')
  held_out = {"val_loss": 0.6, "val_loss_t30": 0.57, "train_loss_t30": 0.31, "val_caption_gain_t30": 0.01,
              "val_direction_gain_t30": 0.0002, "val_digit_gain_t30": 0.0125}
  (tmp_path / "dit" / "metrics.jsonl").write_text(
      "".join(json.dumps({"step": s, "loss": 2.0 - s / 100, "loss_t00_25": 1.0, "loss_tokens": 1900}) + "\n" for s in (10, 20))
      + json.dumps({"step": 25, **held_out}) + "\n")  # An eval off the logging grid: a row without "loss".
  frames = np.zeros((3, 8, 8, 3), np.uint8)
  items = []
  for task in ("t2v", "i2v <script>"):
    out = tmp_path / "samples" / f"{len(items)}.gif"
    out.parent.mkdir(exist_ok=True)
    write_video(out, frames, 8.0)
    items.append(dict(task=task, prompt=f"a red 3 moves right ({task})", output=str(out), inputs=[str(out)]))

  page = report.write_report(config, tmp_path, items, {"train-vae": 12.0}).read_text()
  assert page.count("class='card'><div class='task'>") == 2
  assert "a red 3 moves right (t2v)" in page and "&lt;script&gt;" in page and "<script>" not in page
  assert "src='samples/0.gif'" in page  # Relative links: the page works from disk.
  assert "21.9 dB" in page and "from 1.900 to 1.800" in page
  assert page.count("<svg") >= 4 and "loss_t00_25" in page
  timestep_chart = page[page.index("DiT loss per timestep range"):]
  timestep_chart = timestep_chart[:timestep_chart.index("</svg>")]
  assert "loss_t00_25" in timestep_chart and "loss_tokens" not in timestep_chart  # A count would squash the losses.
  held_out_chart = page[page.index("DiT loss at fixed noise"):]
  held_out_chart = held_out_chart[:held_out_chart.index("</svg>")]
  assert "val_loss_t30" in held_out_chart and "train_loss_t30" in held_out_chart
  assert "caption_gain" not in held_out_chart
  assert "At step 25, the loss at fixed noise on held-out vs training clips (EMA weights): t=0.30 0.570 vs 0.310" in page
  gain_chart = page[page.index("What a wrong caption costs"):]
  gain_chart = gain_chart[:gain_chart.index("</svg>")]
  assert all(k in gain_chart for k in ("val_caption_gain_t30", "val_direction_gain_t30", "val_digit_gain_t30"))
  assert ("At step 25 and t=0.30, the held-out loss rises by 0.0100 with no caption, 0.0125 with a wrong digit, "
          "0.0002 with a wrong direction") in page
  assert not (tmp_path / "report.html.tmp").exists()


def test_report_prefers_the_whole_split_psnr_and_shows_scores(tmp_path):
  config = config_lib.base_config()
  (tmp_path / "vae" / "recon").mkdir(parents=True)
  (tmp_path / "vae" / "recon" / "val_psnr.jsonl").write_text('{"step": 20, "val_psnr": 21.9}\n')
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "vae_psnr_validation.json").write_text(
      json.dumps({"split": "validation", "step": 20, "clips": 200, "psnr_db": 20.25, "per_bucket": {}}))
  note = "Scored automatically: 3/20 show the prompt's digit"
  page = report.write_report(config, tmp_path, [], {}, [note]).read_text()
  assert "200 clips of the validation split at 20.2 dB" in page and "21.9 dB" not in page
  assert html.escape(note) in page and "No samples were scored" not in page
  assert "No samples were scored" in report.write_report(config, tmp_path, [], {}).read_text()


def test_report_shows_every_probe_next_to_its_ceiling(tmp_path):
  (tmp_path / "eval").mkdir()
  protocol = dict(split="validation", count=4, ceiling_count=50, seed=1, sampler="euler", steps=8, guidance=4.0,
                  dit_step=150)
  probes = {"permanence": dict(score=0.25, ceiling=0.8, chance=0.02, n=4, protocol=protocol),
            "offscreen": dict(skipped="the world bounces digits off the frame edges")}
  (tmp_path / "eval" / "probes.json").write_text(json.dumps(dict(protocol=protocol, about={}, probes=probes)))
  (tmp_path / "dit").mkdir()
  (tmp_path / "dit" / "metrics.jsonl").write_text(
      "".join(json.dumps({"step": s, "loss": 1.0, "probe_permanence": s / 1000, "probe_permanence_ceiling": 0.8}) + "\n"
              for s in (100, 200)))
  page = report.write_report(config_lib.base_config(), tmp_path, [], {}).read_text()
  table = page[page.index("World probes (DiT step 150)"):]
  assert "<td>0.25</td><td>0.8</td><td>0.3125</td><td>0.02</td><td>4</td>" in table
  assert "skipped: the world bounces digits off the frame edges" in table
  assert "Probe scores (train.probe_every)" in page and "probe_permanence_ceiling" not in page.split("<table>")[0]
