"""Writing a file so that it exists whole or not at all."""

import os


def write_atomically(path, write) -> None:
  """`write(tmp)` fills a temporary file beside `path`, which is then renamed to `path`.

  The temporary name keeps the extension (`O.tmp-<pid>.mp4`), because writers such as
  PyAV and PIL pick the format by it. A failed write leaves no file behind; a process
  killed mid-write leaves only a `*.tmp-*` file, which readers ignore.
  """
  text = os.fspath(path)
  directory, name = os.path.split(text)
  stem, extension = os.path.splitext(name)
  tmp = os.path.join(directory, f"{stem}.tmp-{os.getpid()}{extension}")
  try:
    write(type(path)(tmp) if not isinstance(path, str) else tmp)
    os.replace(tmp, text)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
