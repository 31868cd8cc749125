"""W/report.html: every task's inputs and outputs with prompts, training curves, metrics.

A single static page with relative links (open it from disk or serve the workdir).
Curves are inline SVG drawn from the stages' metrics.jsonl, so the page needs no
plotting library and no network.
"""

import html
import json
import os
import re

from etils import epath

from vidsim.atomic import write_atomically
from vidsim.eval.vae import eval_path
from vidsim.train import goodput
from vidsim.train.metrics import read_metrics

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
h1{margin-bottom:4px} .sub{color:#666;margin-top:0}
.grid{display:flex;flex-wrap:wrap;gap:16px}
.card{border:1px solid #ddd;border-radius:8px;padding:10px;width:360px;background:#fafafa}
.card img,.card video{image-rendering:pixelated;width:100%;background:#000}
.prompt{font-style:italic} .task{font-weight:bold;font-size:1.05em}
.inputs{display:flex;gap:6px} .inputs figure{margin:0;flex:1} figcaption{font-size:.8em;color:#555}
table{border-collapse:collapse} td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f0f0f0} .honest{background:#fff8e1;border-left:4px solid #f0b400;padding:8px 12px}
svg text{font-size:11px;fill:#444}
"""


def write_report(config, workdir, outputs, timings, quality_notes=None):
  """Writes W/report.html. `outputs`: dicts with task, prompt, output, sheet, inputs, note."""
  workdir = epath.Path(workdir)
  vae_rows = read_metrics(workdir / "vae" / "metrics.jsonl")
  dit_rows = read_metrics(workdir / "dit" / "metrics.jsonl")
  val_psnr = [json.loads(line) for line in _lines(workdir / "vae" / "recon" / "val_psnr.jsonl")]
  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>vidsim demo report</title>"
           f"<style>{_STYLE}</style></head><body>"]
  parts.append("<h1>vidsim demo</h1>")
  parts.append(f"<p class='sub'>Embedded world: {html.escape(config.data.builder)}/{html.escape(config.data.builder_config)}. "
               f"Stage times of this invocation (a re-run skips finished work): {', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}.</p>")

  parts.append("<h2>How good is this?</h2><div class='honest'>")
  dit_logged = [row for row in dit_rows if "loss" in row]  # Held-out evals may have rows of their own.
  gains = _caption_gain_keys(dit_rows)
  parts.append(_honest_summary(config, workdir, vae_rows, dit_rows, dit_logged, gains, val_psnr, quality_notes))
  parts.append("</div>")

  parts.append("<h2>Generated videos</h2><div class='grid'>")
  for item in outputs:
    parts.append(_card(workdir, item))
  parts.append("</div>")

  parts.append("<h2>Training curves</h2><div class='grid'>")
  parts.append(_chart("VAE loss", vae_rows, ["loss"]))
  parts.append(_chart("VAE PSNR (train batch, dB)", vae_rows, ["psnr"]))
  if val_psnr:
    parts.append(_chart("VAE validation PSNR (EMA, dB)", val_psnr, ["val_psnr"]))
  parts.append(_chart("DiT loss", dit_rows, ["loss"]))
  t_keys = sorted({k for row in dit_rows for k in row if re.fullmatch(r"loss_t\d+_\d+", k)})
  parts.append(_chart("DiT loss per timestep range", dit_rows, t_keys))
  held_out = sorted({k for row in dit_rows for k in row if re.fullmatch(r"(val|train)_loss_t\d+", k)})
  if held_out:
    parts.append(_chart("DiT loss at fixed noise, held-out vs train (EMA)", dit_rows, held_out))
  if gains:
    parts.append(_chart("What a wrong caption costs the DiT (held-out loss at the highest eval noise)", dit_rows, gains))
  parts.append("</div>")

  probe_keys = sorted({k for row in dit_rows for k in row if k.startswith("probe_") and not k.endswith("_ceiling")})
  if probe_keys:
    parts.append("<h2>World probes during training (EMA)</h2><div class='grid'>")
    parts.append(_chart("Probe scores (train.probe_every)", dit_rows, probe_keys))
    parts.append("</div>")
  parts.append(_eval_section(workdir))

  accounts = goodput.workdir_account(workdir)
  if accounts:
    parts.append("<h2>Where the training time went (goodput, all restarts)</h2>")
    parts.append(_goodput_table(accounts))
  parts.append("<h2>Metrics (last logged step)</h2>")
  parts.append(_table({"VAE": vae_rows[-1] if vae_rows else {}, "DiT": dit_logged[-1] if dit_logged else {}}))
  recon = sorted((workdir / "vae" / "recon").glob("*.gif")) if (workdir / "vae" / "recon").exists() else []
  if recon:
    parts.append("<h2>VAE reconstructions (input left, reconstruction right)</h2>")
    parts.append(f"<img style='image-rendering:pixelated;width:480px' src='{_rel(workdir, recon[-1])}'>")
  parts.append("</body></html>")
  out = workdir / "report.html"
  write_atomically(out, lambda tmp: tmp.write_text("\n".join(parts)))
  return out


def latest_probes(workdir):
  """W/eval/probes.json (`vidsim eval`), else the newest probes_step_*.json of the training hook, else None."""
  eval_dir = epath.Path(workdir) / "eval"
  if not eval_dir.exists():
    return None
  candidates = [eval_dir / "probes.json"] if (eval_dir / "probes.json").exists() else []
  candidates = candidates or sorted(eval_dir.glob("probes_step_*.json"))[-1:]
  return json.loads(candidates[0].read_text()) if candidates else None


def _eval_section(workdir) -> str:
  """`vidsim eval`'s figures: every world probe next to its ceiling and chance, and the VAE's."""
  parts = []
  result = latest_probes(workdir)
  if result:
    step = result["protocol"].get("dit_step")
    p = result["protocol"]
    parts.append(f"<h2>World probes (DiT step {step})</h2>"
                 f"<p class='sub'>{p['count']} generated clips a probe ({html.escape(p['sampler'])}, {p['steps']} steps, "
                 f"guidance {p['guidance']}, seed {p['seed']}); ceiling: the same probe on {p['ceiling_count']} true "
                 f"clips of the {html.escape(p['split'])} split; chance: realistic clips that do not answer the "
                 "inputs (docs/eval.md).</p>")
    rows = ["<tr><th>probe</th><th>score</th><th>ceiling</th><th>score / ceiling</th><th>chance</th><th>n</th>"
            "<th>what it checks</th></tr>"]
    about = result.get("about", {})
    for name, entry in result["probes"].items():
      what = html.escape(about.get(name.split("_")[0], ""))
      if "skipped" in entry:
        rows.append(f"<tr><th>{html.escape(name)}</th><td colspan='5' style='text-align:left'>skipped: "
                    f"{html.escape(entry['skipped'])}</td><td style='text-align:left'>{what}</td></tr>")
        continue
      ratio = (entry["score"] / entry["ceiling"]) if entry["score"] is not None and entry["ceiling"] else None
      rows.append(f"<tr><th>{html.escape(name)}</th><td>{_fmt(entry['score'])}</td><td>{_fmt(entry['ceiling'])}</td>"
                  f"<td>{_fmt(ratio)}</td><td>{_fmt(entry['chance'])}</td><td>{entry['n']}</td>"
                  f"<td style='text-align:left'>{what}</td></tr>")
    parts.append(f"<table>{''.join(rows)}</table>")
  vae_path = epath.Path(workdir) / "eval" / "vae.json"
  if vae_path.exists():
    vae = json.loads(vae_path.read_text())
    rows = ["<tr><th>data</th><th>clips</th><th>PSNR (dB)</th><th>SSIM</th></tr>"]
    for split, r in vae["splits"].items():
      for name, entry in [("all", r)] + sorted(r["per_kind"].items()) + sorted(r["per_bucket"].items()):
        rows.append(f"<tr><th>{html.escape(split)} {html.escape(name)}</th><td>{entry['clips']}</td>"
                    f"<td>{_fmt(entry['psnr_db'])}</td><td>{_fmt(entry['ssim'])}</td></tr>")
    parts.append("<h2>VAE reconstruction (vidsim eval)</h2>" + f"<table>{''.join(rows)}</table>")
  return "".join(parts)


def _lines(path):
  path = epath.Path(path)
  return [line for line in path.read_text().splitlines() if line] if path.exists() else []


def _rel(workdir, path):
  return html.escape(os.path.relpath(str(path), str(workdir)))


def _media(workdir, path, label=""):
  src = _rel(workdir, path)
  tag = (f"<video src='{src}' autoplay loop muted playsinline></video>" if str(path).endswith(".mp4")
         else f"<img src='{src}' alt='{html.escape(label)}'>")
  return f"<figure>{tag}<figcaption>{html.escape(label)}</figcaption></figure>"


def _card(workdir, item):
  inputs = "".join(_media(workdir, p, f"input {i + 1}") for i, p in enumerate(item.get("inputs", [])))
  body = [f"<div class='card'><div class='task'>{html.escape(item['task'])}</div>",
          f"<div class='prompt'>“{html.escape(item.get('prompt', ''))}”</div>"]
  if inputs:
    body.append(f"<div class='inputs'>{inputs}</div>")
  body.append(_media(workdir, item["output"], "output"))
  if item.get("sheet"):
    body.append(_media(workdir, item["sheet"], "contact sheet (conditioning frames outlined)"))
  if item.get("note"):
    body.append(f"<div>{html.escape(item['note'])}</div>")
  body.append("</div>")
  return "".join(body)


def _caption_gain_keys(dit_rows) -> list:
  """The held-out caption gains (vidsim/train/dit_hooks.py: no caption, wrong direction, wrong digit) at the highest eval time."""
  keys = {k for row in dit_rows for k in row if re.fullmatch(r"val_\w+_gain_t\d+", k)}
  if not keys:
    return []
  top = max(k.rsplit("_", 1)[1] for k in keys)
  return sorted(k for k in keys if k.endswith("_" + top))


def _chart(title, rows, keys, width=360, height=200):
  colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
  series = [(k, [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]) for k in keys]
  series = [(k, pts) for k, pts in series if pts]
  if not series:
    return f"<div class='card'><b>{html.escape(title)}</b><p>no data</p></div>"
  xs = [x for _, pts in series for x, _ in pts]
  ys = [y for _, pts in series for _, y in pts]
  x0, x1 = min(xs), max(xs) or 1
  y0, y1 = min(ys), max(ys)
  if y1 == y0:
    y1 = y0 + 1
  pad = 30

  def sx(x):
    return pad + (x - x0) / max(x1 - x0, 1) * (width - 2 * pad)

  def sy(y):
    return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

  svg = [f"<svg width='{width}' height='{height}'>",
         f"<rect x='{pad}' y='{pad}' width='{width - 2 * pad}' height='{height - 2 * pad}' fill='#fff' stroke='#ccc'/>",
         f"<text x='{pad}' y='{height - 8}'>{x0}</text><text x='{width - pad - 20}' y='{height - 8}'>{x1}</text>",
         f"<text x='2' y='{pad + 4}'>{y1:.3g}</text><text x='2' y='{height - pad}'>{y0:.3g}</text>"]
  for i, (key, pts) in enumerate(series):
    color = colors[i % len(colors)]
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    svg.append(f"<polyline fill='none' stroke='{color}' stroke-width='1.5' points='{path}'/>")
    svg.append(f"<text x='{pad + 4 + 90 * (i % 3)}' y='{pad - 6 - 12 * (i // 3)}' style='fill:{color}'>{html.escape(key)}</text>")
  svg.append("</svg>")
  return f"<div class='card'><b>{html.escape(title)}</b><br>{''.join(svg)}</div>"


def _table(named_rows):
  keys = sorted({k for row in named_rows.values() for k in row})
  head = "".join(f"<th>{html.escape(name)}</th>" for name in named_rows)
  body = []
  for k in keys:
    cells = "".join(f"<td>{_fmt(row.get(k))}</td>" for row in named_rows.values())
    body.append(f"<tr><th>{html.escape(k)}</th>{cells}</tr>")
  return f"<table><tr><th>metric</th>{head}</tr>{''.join(body)}</table>"


def _goodput_table(accounts):
  """Seconds and share of wall time per phase, one column per stage (vidsim/train/goodput.py)."""
  keys = list(next(iter(accounts.values()))["seconds"])
  head = "".join(f"<th>{html.escape(stage)}</th>" for stage in accounts)
  rows = [f"<tr><td>wall (s), attempts</td>" + "".join(
      f"<td>{a['wall_s']:.0f}, {len(a['attempts'])}</td>" for a in accounts.values()) + "</tr>"]
  rows.append("<tr><td><b>goodput</b></td>" + "".join(
      f"<td><b>{100 * a['goodput']:.1f}%</b></td>" for a in accounts.values()) + "</tr>")
  for key in keys:
    cells = "".join(f"<td>{a['seconds'][key]:.1f} s ({100 * a['seconds'][key] / max(a['wall_s'], 1e-9):.1f}%)</td>"
                    for a in accounts.values())
    rows.append(f"<tr><td>{html.escape(key)}</td>{cells}</tr>")
  return f"<table><tr><th>phase</th>{head}</tr>{''.join(rows)}</table>"


def _fmt(value):
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}"
  return html.escape(str(value))


def _honest_summary(config, workdir, vae_rows, dit_rows, dit_logged, gains, val_psnr, quality_notes):
  lines = []
  split_eval = eval_path(workdir, config.data.eval_split)
  vae_note = ("(an all-black frame scores about 17 dB on this world; the VAE benchmark's target is 30 dB). "
              "Every given frame below passes through it, so its softness is the VAE's.")
  if split_eval.exists():
    result = json.loads(split_eval.read_text())
    lines.append(f"The VAE trained {result['step']} steps and reconstructs the {result['clips']} clips of the "
                 f"{result['split']} split at {result['psnr_db']:.1f} dB PSNR {vae_note}")
  elif val_psnr:
    lines.append(f"The VAE trained {val_psnr[-1]['step']} steps and reconstructs a validation batch at "
                 f"{val_psnr[-1]['val_psnr']:.1f} dB PSNR {vae_note}")
  if dit_logged:
    first, last = dit_logged[0], dit_logged[-1]
    lines.append(f"The DiT trained {last['step']} steps of {config.train.steps}; its flow loss went from "
                 f"{first['loss']:.3f} to {last['loss']:.3f} (predicting zero velocity scores 2.0 on unit-scale "
                 "latents).")
  held_out = [row for row in dit_rows if "val_loss" in row]
  if held_out:
    row = held_out[-1]
    pairs = sorted(k[len("val_loss_"):] for k in row if re.fullmatch(r"val_loss_t\d+", k) and f"train_loss_{k[len('val_loss_'):]}" in row)
    lines.append(f"At step {row['step']}, the loss at fixed noise on held-out vs training clips (EMA weights): "
                 + ", ".join(f"t=0.{name[1:]} {row[f'val_loss_{name}']:.3f} vs {row[f'train_loss_{name}']:.3f}"
                             for name in pairs)
                 + " (a held-out loss well above the training one means the model memorises its clips).")
  if gains:
    row = [r for r in dit_rows if gains[0] in r][-1]
    what = lambda key: "no caption" if key.startswith("val_caption_") else f"a wrong {key.split('_')[1]}"
    time = gains[0].rsplit("_", 1)[1]
    lines.append(f"At step {row['step']} and t=0.{time[1:]}, the held-out loss rises by "
                 + ", ".join(f"{row[k]:.4f} with {what(k)}" for k in gains if k in row)
                 + " (about 0: the model ignores that part of the prompt).")
  for note in quality_notes or []:
    lines.append(note)
  if not quality_notes:
    lines.append("No samples were scored for this run (vidsim/digit_score.py scores one-digit moving_digits "
                 "videos only), so nothing on this page claims the samples are good: judge them by eye against "
                 "the prompts.")
  return "<br>".join(html.escape(line) for line in lines)
