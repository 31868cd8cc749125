"""A VAE on real-image clips: synthetic camera moves over the two photographs bundled with
scikit-learn (china.jpg, flower.jpg), so nothing is downloaded. These clips have real
image content (textures, edges, colour) but synthetic motion: pans and zooms of a
virtual camera, with no moving objects, no motion blur and no compression history
other than the mp4 written here.

Commands (the folder path is this config's default):
  python experiments/photo_vae.py clips /tmp/photo_clips   # write the clips
  vidsim data prepare --config experiments/photo_vae.py
  vidsim train-vae --config experiments/photo_vae.py --workdir runs/photo_vae

Running this file writes 2 photos x 6 camera paths = 12 mp4 files (33 frames, 64x64,
8 fps) and a captions.jsonl naming the photo and the move. get_config() trains a VAE of
the digits_vae widths and optimizer settings on that folder for a few minutes; the
validation clips are other camera paths over the same two photographs (so: new views,
not new content).
Expected runtime: 240 steps, 4.5 minutes on 2 cores of an AMD EPYC (Zen 5) shared with
other jobs (load average ~7).
Expected result: 16.5 dB PSNR on the 4 validation clips (whole clips, 33 frames at
64x64), still rising fast; a digits VAE scores 6.7 dB on them (out of domain).
Measured figures and commands: docs/benchmarks.md, "Real images".
"""

import json
import pathlib
import sys

import numpy as np
from PIL import Image

from vidsim.config import base_config
from vidsim.data.video_io import write_video

FRAMES, SIZE, FPS = 33, 64, 8.0
DEFAULT_FOLDER = "/tmp/photo_clips"


def get_config():
  c = base_config()
  c.data.builder = "video_folder"
  c.video_folder.path = DEFAULT_FOLDER
  c.video_folder.max_frames = FRAMES
  c.video_folder.fps = FPS
  c.video_folder.validation_fraction = 0.2  # Holds out 4 of the 12 clips (hash split).
  c.video_folder.frame_format = "png"  # Lossless: PSNR measures the VAE, not JPEG.
  c.data.buckets = ((9, SIZE, SIZE),)  # Native 64x64: random 9-frame windows of the 33.
  c.data.batch_size = 4  # The pixels of 16 digit clips at 32x32.
  # digits_vae's widths and optimizer settings, trained for a few minutes; 16 latent
  # channels and the base config's spatial_only_levels (2), unlike digits_vae.
  c.vae.latent_channels = 16
  c.vae_train.recon_loss = "l2"
  c.vae_train.steps = 240
  c.vae_train.learning_rate = 3e-3
  c.vae_train.warmup_steps = 50
  c.vae_train.end_lr_fraction = 0.3
  c.vae_train.ema_decay = 0.99
  c.vae_train.log_every = 20
  c.vae_train.checkpoint_every = 120
  c.vae_train.recon_every = 60
  return c


# Camera paths: (start centre, end centre) as fractions of the photo, and (start, end)
# window side as a fraction of the photo's height. A window leaving the photo is clamped.
MOVES = {
    "pan_right": ((0.25, 0.5), (0.75, 0.5), (0.45, 0.45)),
    "pan_left": ((0.7, 0.35), (0.3, 0.65), (0.35, 0.35)),
    "pan_down": ((0.5, 0.25), (0.5, 0.75), (0.4, 0.4)),
    "tilt_diagonal": ((0.3, 0.3), (0.65, 0.7), (0.5, 0.5)),
    "zoom_in": ((0.5, 0.5), (0.55, 0.45), (0.9, 0.3)),
    "zoom_out": ((0.4, 0.6), (0.5, 0.5), (0.25, 0.8)),
}


def camera_clip(photo: np.ndarray, start, end, sides) -> np.ndarray:
  """uint8 [FRAMES, SIZE, SIZE, 3]: square windows moving linearly from start to end."""
  height, width, _ = photo.shape
  image = Image.fromarray(photo)
  frames = []
  for t in np.linspace(0.0, 1.0, FRAMES):
    cx, cy = (1 - t) * np.asarray(start) + t * np.asarray(end)
    side = ((1 - t) * sides[0] + t * sides[1]) * height
    x0 = float(np.clip(cx * width - side / 2, 0, width - side))
    y0 = float(np.clip(cy * height - side / 2, 0, height - side))
    # Sub-pixel window positions through PIL's box resampling, so the motion is smooth.
    frames.append(np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BOX, box=(x0, y0, x0 + side, y0 + side))))
  return np.stack(frames)


def write_clips(out_dir: str) -> None:
  # Imported here: loading the config should not pay for scikit-learn.
  from sklearn.datasets import load_sample_images

  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  bundle = load_sample_images()
  captions = []
  for filename, photo in zip(bundle.filenames, bundle.images):
    photo_name = pathlib.Path(filename).stem
    for move, (start, end, sides) in MOVES.items():
      name = f"{photo_name}_{move}.mp4"
      write_video(out / name, camera_clip(photo, start, end, sides), fps=FPS)
      captions.append({"file": name, "caption": f"{move.replace('_', ' ')} over the {photo_name} photograph"})
  (out / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
  print(f"wrote {len(captions)} clips to {out}")


def photo_psnr(vae_config_path: str, workdir: str, folder: str = DEFAULT_FOLDER) -> dict:
  """PSNR of the VAE trained by `vae_config_path` in `workdir` on the whole folder clips
  (33 frames at their native 64x64, first frames, no crop), per split."""
  from vidsim import mesh as mesh_lib
  from vidsim.config import load_config
  from vidsim.eval import vae as vae_eval

  config = get_config()
  config.video_folder.path = folder
  config.vae = load_config(vae_config_path).vae  # The checkpoint's architecture.
  config.data.buckets = ((FRAMES, SIZE, SIZE),)
  config.data.batch_size = 4
  mesh = mesh_lib.job_mesh(config)
  return {split: round(vae_eval.evaluate_split(config, workdir, mesh, split)["psnr_db"], 2)
          for split in ("validation", "train")}


USAGE = """usage:
  python experiments/photo_vae.py clips OUT_DIR
  python experiments/photo_vae.py psnr VAE_CONFIG WORKDIR [FOLDER]"""

if __name__ == "__main__":
  if len(sys.argv) >= 3 and sys.argv[1] == "clips":
    write_clips(sys.argv[2])
  elif len(sys.argv) in (4, 5) and sys.argv[1] == "psnr":
    print(json.dumps(photo_psnr(*sys.argv[2:])))
  else:
    sys.exit(USAGE)
