"""Growing files (metrics.jsonl, TensorBoard event files) for a folder in a bucket, where
an object cannot be appended to: they are written in a local temporary folder, and `sync`
uploads each one that grew since the last sync, whole (one upload per file, which is
atomic: the bucket always holds a complete copy of an earlier state of the file).

Uploading whole files is what keeps this simple, and what makes its cost grow with the
file: the writer bounds it by starting a new file once one is big (`finish` uploads a
file a last time and drops the local copy). A run killed with SIGKILL leaves its
temporary folder behind (its files are copies: what was synced is in the bucket).
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile

from moetrain import paths


class StagedFolder:
  """A local temporary folder whose files `sync` copies to the same names under `remote`
  (a gs:// folder, or a local one)."""

  def __init__(self, remote):
    self.remote = paths.path(remote)
    self.local = pathlib.Path(tempfile.mkdtemp(prefix='moetrain-staged-'))
    self._synced: dict[str, int] = {}  # name -> size at its last upload.
    self._finished: set[str] = set()

  def file(self, name: str) -> pathlib.Path:
    """The local path of `name` (its folder created)."""
    local = self.local / name
    local.parent.mkdir(parents=True, exist_ok=True)
    return local

  def finish(self, name: str):
    """`name` will not change again: the next sync uploads it a last time and deletes the
    local copy."""
    self._finished.add(name)

  def sync(self):
    """Uploads every file that changed size since its last upload (the files here only
    grow), then drops the finished ones."""
    for local in sorted(p for p in self.local.rglob('*') if p.is_file()):
      name = local.relative_to(self.local).as_posix()
      size = local.stat().st_size
      if self._synced.get(name) != size:
        paths.upload(local, self.remote / name)
        self._synced[name] = size
      if name in self._finished:
        local.unlink()

  def close(self):
    """A last sync, then the temporary folder goes."""
    self.sync()
    shutil.rmtree(self.local, ignore_errors=True)
