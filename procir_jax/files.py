"""Writing files that other processes, or a rerun, may read at any moment."""

from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object]
                     ) -> None:
  """Calls `write` on a temporary file beside `path`, then renames it into place,
  so a reader or a crash never sees half a file."""
  path = os.fspath(path)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp_")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    # mkstemp makes the file private; results are as readable as any file written.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
