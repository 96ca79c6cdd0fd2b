"""Where a run reads and writes: a local folder or a Google Cloud Storage bucket
(`gs://BUCKET/...`), through the few operations moetrain needs, on etils.epath (which
orbax uses for checkpoints too).

Local paths keep what a POSIX filesystem gives: a file written whole through a temporary
name and `os.replace`, exclusive creation with O_EXCL, atomic renames. In a bucket an
object is uploaded whole (so a write is atomic by itself), a rename is a copy and a
delete (not atomic: only moetrain's process 0 moves checkpoints aside), there are no
folders to create, and exclusive creation is an upload with the precondition
ifGenerationMatch=0 (google-cloud-storage), which GCS enforces.

A `gs://` path needs the gcp extra (gcsfs for epath, google-cloud-storage): `path`
raises ConfigError naming it, before anything is written, when it is missing; nothing
here turns a cloud path into a local one (pathlib would make a folder named `gs:`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os

from etils import epath

from moetrain.config import ConfigError

SCHEMES = ('gs',)
EXTRA = 'gcp'
EXTRA_MODULES = {'gcsfs': 'gcsfs', 'google.cloud.storage': 'google-cloud-storage'}


def is_cloud(p) -> bool:
  """Whether `p` names an object store (`gs://...`) rather than a local path."""
  return '://' in os.fspath(p) if isinstance(p, (str, os.PathLike)) else False


def check(p):
  """Raises ConfigError (one sentence) when `p` is a cloud path moetrain cannot use here:
  a scheme other than gs://, or the gcp extra not installed."""
  if not is_cloud(p):
    return
  scheme = os.fspath(p).split('://', 1)[0]
  if scheme not in SCHEMES:
    raise ConfigError(f'{p} is a {scheme}:// path, and moetrain reads and writes local '
                      'folders and gs:// buckets only; use one of those.')
  missing = [package for module, package in EXTRA_MODULES.items() if not _importable(module)]
  if missing:
    raise ConfigError(f'{p} is in Google Cloud Storage, which needs the {EXTRA} extra '
                      f'({", ".join(missing)} not installed): pip install '
                      f'"moetrain[{EXTRA}]" (or ".[{EXTRA}]" in a checkout).')


@functools.cache
def _importable(module: str) -> bool:
  try:
    importlib.import_module(module)
  except ImportError:
    return False
  return True


def path(p) -> epath.Path:
  """`p` (a str, pathlib or epath path) as an epath.Path, after `check`."""
  check(p)
  return p if isinstance(p, epath.Path) else epath.Path(p)


def absolute(p) -> epath.Path:
  """`path(p)`, made absolute when local."""
  p = path(p)
  return p if is_cloud(p) else epath.Path(os.path.abspath(p))


def exists(p) -> bool:
  return path(p).exists()


def is_file(p) -> bool:
  return path(p).is_file()


def is_dir(p) -> bool:
  return path(p).is_dir()


def read_text(p) -> str:
  return path(p).read_text()


def read_bytes(p) -> bytes:
  return path(p).read_bytes()


def make_dirs(p):
  """mkdir -p (nothing to do in a bucket, which has no folders)."""
  if not is_cloud(p):
    path(p).mkdir(parents=True, exist_ok=True)


def write_bytes(p, data: bytes):
  """Writes `p` whole: a local file goes through a temporary name and `os.replace`, so
  a failure never leaves half a file; an object upload is whole by itself."""
  p = path(p)
  if is_cloud(p):
    p.write_bytes(data)
    return
  tmp = p.with_name(p.name + '.tmp')
  try:
    tmp.write_bytes(data)
    os.replace(tmp, p)
  except BaseException:
    with contextlib.suppress(OSError):
      tmp.unlink()
    raise


def write_text(p, text: str):
  """`write_bytes` of UTF-8 text."""
  write_bytes(p, text.encode())


def upload(local_file, p):
  """Copies the local file `local_file` to `p` (a cloud object, or a local path whose
  folder is made if needed)."""
  make_dirs(path(p).parent)
  with open(local_file, 'rb') as f:
    write_bytes(p, f.read())


def rename(src, dst):
  """Moves a file or folder (atomic locally; a copy and a delete in a bucket)."""
  src, dst = path(src), path(dst)
  if is_cloud(src):
    src.rename(dst)
  else:
    os.rename(src, dst)


def glob(p, pattern: str) -> list[epath.Path]:
  """The paths under folder `p` that match `pattern`, sorted."""
  return sorted(path(p).glob(pattern))


def remove(p, missing_ok: bool = True):
  """Deletes the file `p`."""
  path(p).unlink(missing_ok=missing_ok)


def create_new(p, text: str):
  """Creates file `p` holding `text`, or raises FileExistsError if it exists (also when
  another process creates it at the same moment)."""
  p = path(p)
  if not is_cloud(p):
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    return
  from google.api_core import exceptions
  blob = _blob(p)
  if blob.exists():  # what an emulator sees too: they ignore the precondition below.
    raise FileExistsError(str(p))
  try:
    blob.upload_from_string(text.encode(), if_generation_match=0)
  except exceptions.PreconditionFailed:
    raise FileExistsError(str(p)) from None


def remove_if(p, test) -> bool:
  """Deletes file `p` if `test(its text)` holds and `p` does not change meanwhile (a
  rename aside locally; a delete with an ifGenerationMatch precondition in a bucket).
  Returns whether it was deleted."""
  p = path(p)
  if not is_cloud(p):
    aside = p.with_name(f'{p.name}.removing.{os.getpid()}')
    try:
      os.rename(p, aside)
    except FileNotFoundError:
      return False
    if not test(aside.read_text()):  # changed meanwhile: put it back.
      os.rename(aside, p)
      return False
    os.unlink(aside)
    return True
  from google.api_core import exceptions
  blob = _blob(p, lookup=True)
  if blob is None:
    return False
  try:
    if not test(blob.download_as_text(if_generation_match=blob.generation)):
      return False
    blob.delete(if_generation_match=blob.generation)
  except (exceptions.PreconditionFailed, exceptions.NotFound):
    return False
  return True


@functools.cache
def _client():
  from google.cloud import storage
  return storage.Client()


def _blob(p, lookup: bool = False):
  """The google-cloud-storage blob of gs://BUCKET/NAME (None when `lookup` finds none)."""
  bucket, _, name = os.fspath(p).split('://', 1)[1].partition('/')
  bucket = _client().bucket(bucket)
  return bucket.get_blob(name) if lookup else bucket.blob(name)
