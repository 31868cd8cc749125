"""One logger for the package; progress and summaries only from process 0."""

import logging
import sys

_LOGGER_NAME = "vidsim"


class _ProcessFormatter(logging.Formatter):
  """Prefixes records with the process index once jax.distributed is up."""

  def format(self, record):
    message = super().format(record)
    count = _process_count()
    if count > 1:
      return f"[p{_process_index()}/{count}] {message}"
    return message


def _process_index():
  import jax  # Imported lazily: logging must not initialise a backend.

  return jax.process_index()


def _process_count():
  import jax

  return jax.process_count() if _backend_ready() else 1


def _backend_ready():
  import jax._src.xla_bridge as xb  # Private, but the only way to not trigger init.

  return getattr(xb, "_backends", None) not in (None, {})


def get_logger(name=None):
  """The package logger (or a child of it); configures a stderr handler once."""
  root = logging.getLogger(_LOGGER_NAME)
  if not root.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ProcessFormatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
  return root.getChild(name) if name else root


def is_chief():
  """True on process 0: the one that prints progress, summaries and writes shared files."""
  if not _backend_ready():
    return True
  return _process_index() == 0


def progress(iterable=None, **kwargs):
  """A tqdm progress bar with ETA, shown on process 0 only."""
  from tqdm.auto import tqdm

  kwargs.setdefault("disable", not is_chief())
  kwargs.setdefault("dynamic_ncols", True)
  kwargs.setdefault("file", sys.stderr)
  return tqdm(iterable, **kwargs)
