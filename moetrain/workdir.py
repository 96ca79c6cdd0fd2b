"""The workdir's own files, through small functions in one place: the lock that keeps one
run per workdir, the small text files a run writes, and the one sentence for a write the
filesystem refuses. A workdir is a local folder or a gs:// bucket (moetrain.paths).

The lock is `WORKDIR/moetrain.lock`, a JSON file naming its holder (host, pid, process
start time, command). It is created atomically (O_EXCL locally; in a bucket, an upload
with ifGenerationMatch=0, which GCS enforces and the test emulator does not); a second
run refuses at once, naming the holder. A lock whose holder is gone (same host, pid no
longer running or reused by another process) is taken over with a warning. In a
multi-process run process 0 holds it and the others follow its verdict.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import gc
import json
import logging
import os
import pathlib
import shutil
import socket
import sys

from moetrain import paths

LOCK = 'moetrain.lock'


class WorkdirError(RuntimeError):
  """A workdir that cannot be used (locked, not writable, full); one sentence."""


def process_start_ticks(pid: int) -> int | None:
  """When `pid` started, in clock ticks since boot (Linux /proc; None elsewhere or when
  there is no such process). Tells a live holder from a new process that reused its pid."""
  try:
    stat = pathlib.Path(f'/proc/{pid}/stat').read_text()
  except OSError:
    return None
  return int(stat.rsplit(')', 1)[1].split()[19])


def holder() -> dict:
  """This process as a lock holder."""
  return dict(host=socket.gethostname(), pid=os.getpid(),
              start_ticks=process_start_ticks(os.getpid()),
              started=datetime.datetime.now().isoformat(timespec='seconds'),
              command=' '.join(sys.argv)[:300])


def is_running(info: dict) -> bool | None:
  """Whether the holder in a lock still runs: True, False, or None when it cannot be
  known (another host)."""
  if info.get('host') != socket.gethostname():
    return None
  pid = info.get('pid')
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process: it exists.
    pass
  except (TypeError, OverflowError):
    return False
  ticks = process_start_ticks(pid)
  return not (ticks is not None and info.get('start_ticks') not in (None, ticks))


def read_lock(path) -> dict:
  """The holder recorded in a lock file ({} when it is unreadable or half written)."""
  try:
    return _parse(paths.read_text(path))
  except OSError:
    return {}


def _describe(info: dict) -> str:
  if not info:
    return 'an unknown holder (the lock file is unreadable)'
  return (f"pid {info.get('pid')} on host {info.get('host')}, started "
          f"{info.get('started', '?')}")


def acquire(workdir, log=print) -> dict:
  """Creates the lock of `workdir` for this process (taking over a stale one with a
  warning through `log`). Returns the holder written; raises WorkdirError naming the
  holder when another run has it."""
  workdir = paths.path(workdir)
  make_dirs(workdir)
  path, me = workdir / LOCK, holder()
  for _ in range(3):
    try:
      paths.create_new(path, json.dumps(me))
    except FileExistsError:
      info = read_lock(path)
      running = is_running(info) if info else None
      if running is False and _take_over(path, info):
        log(f'warning: {path} was held by {_describe(info)}, which is no longer running; '
            'taking the lock over.')
        continue
      if running is False:
        continue  # another run took it over first: look again.
      hint = ('' if running else f'; if that run is gone, delete {path}')
      raise WorkdirError(f'{workdir} is in use by another moetrain run ({_describe(info)}); '
                         f'wait for it to end or choose another --workdir{hint}.') from None
    except OSError as e:
      raise WorkdirError(os_error_sentence(e, path)) from None
    return me
  raise WorkdirError(f'{path} keeps changing hands; another run is starting in {workdir}; '
                     'choose another --workdir.')


def _take_over(path, stale: dict) -> bool:
  """Removes a stale lock; False when it changed hands meanwhile."""
  return paths.remove_if(path, lambda text: _parse(text) == stale)


def _parse(text: str) -> dict:
  """The holder in the text of a lock ({} when it is not one)."""
  try:
    info = json.loads(text)
  except ValueError:
    return {}
  return info if isinstance(info, dict) else {}


def release(workdir, me: dict):
  """Removes the lock if this process still holds it."""
  paths.remove_if(paths.path(workdir) / LOCK, lambda text: _parse(text) == me)


@contextlib.contextmanager
def locked(workdir, log=print):
  """Holds the workdir lock for the duration (process 0 of a multi-process run holds it;
  every process stops if it cannot be had)."""
  import jax
  me, error = None, None
  if jax.process_index() == 0:
    try:
      me = acquire(workdir, log)
    except WorkdirError as e:
      error = e
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not ok and error is None:
      error = WorkdirError(f'process 0 could not lock {workdir}; see its log.')
  if error is not None:
    raise error
  try:
    yield
  finally:
    if me is not None:
      release(workdir, me)


def make_dirs(path):
  """mkdir -p, with one sentence when the filesystem refuses."""
  try:
    paths.make_dirs(path)
  except OSError as e:
    raise WorkdirError(os_error_sentence(e, path)) from None


def free_bytes(path) -> int:
  """Bytes free for this user on the filesystem holding `path`."""
  return shutil.disk_usage(path).free


def tree_bytes(path) -> int:
  """Bytes in the files under the local folder `path` (0 when it does not exist)."""
  return sum(f.stat().st_size for f in pathlib.Path(path).rglob('*') if f.is_file())


def check_room(path, need: int):
  """Raises OSError(ENOSPC) before a write of about `need` bytes under the local folder
  `path` that the filesystem has no room for (a save that fails half way leaves noise in
  the output)."""
  free = free_bytes(path)
  if free < need:
    raise OSError(errno.ENOSPC, f'{free} bytes free, {need} needed', str(path))


def write_text(path, text: str):
  """Writes a small file of the workdir (config.json, summary.json) whole: to a
  temporary name, then renamed, so a full disk never leaves half a file."""
  try:
    paths.write_text(path, text)
  except OSError as e:
    raise WorkdirError(os_error_sentence(e, path)) from None


RESUME = 'run the same command again to resume from the last checkpoint'
FIXES = {
    errno.ENOSPC: ('the disk is full', f'free space there, then {RESUME}'),
    errno.EDQUOT: ('the disk quota is exhausted', f'free space there, then {RESUME}'),
    errno.EROFS: ('its filesystem is read-only',
                  f'remount it writable (then {RESUME}) or choose another --workdir'),
    errno.EACCES: ('permission is denied',
                   'make it writable for this user or choose another --workdir'),
    errno.EPERM: ('the operation is not permitted',
                  'make it writable for this user or choose another --workdir'),
}
TEXTS = {'No space left on device': errno.ENOSPC, 'Disk quota exceeded': errno.EDQUOT,
         'Read-only file system': errno.EROFS, 'Permission denied': errno.EACCES}


def io_errno(error: BaseException) -> int | None:
  """The errno of a write failure: from an OSError anywhere in the exception's chain, or
  from the text of errors that carry it only as words (orbax and TensorStore wrap it)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in FIXES:
      return error.errno
    for text, number in TEXTS.items():
      if text in str(error):
        return number
    error = error.__cause__ or error.__context__
  return None


def refused_write_in(error: BaseException, workdir) -> bool:
  """Whether `error` is the filesystem refusing a write under `workdir` (its chain has a
  refusal errno, and a file name or message naming a path in the workdir): not, say, an
  unreadable data file elsewhere."""
  if io_errno(error) is None:
    return False
  roots = {str(workdir)} if paths.is_cloud(workdir) else {
      str(pathlib.Path(workdir)), str(pathlib.Path(workdir).absolute())}
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    names = [str(getattr(error, 'filename', None) or ''), str(error)]
    if any(root in name for root in roots for name in names):
      return True
    error = error.__cause__ or error.__context__
  return False


def os_error_sentence(error: BaseException, path) -> str:
  """One sentence for a failed write under `path`: where, why, what to do."""
  number = io_errno(error)
  if number is None:
    text = str(error).strip().splitlines()[0][:200] if str(error).strip() else ''
    return f'could not write to {path} ({type(error).__name__}: {text}); check that path.'
  why, fix = FIXES[number]
  return f'could not write to {path} because {why}; {fix}.'


class _DropWriteErrorLogs(logging.Filter):
  """Drops the log records of orbax's background save threads (and of asyncio, about
  their futures) that report a write the filesystem refused: the same error reaches the
  caller as an exception, which becomes one sentence."""

  def filter(self, record: logging.LogRecord) -> bool:
    from_saver = record.name == 'asyncio' or '/orbax/' in record.pathname.replace('\\', '/')
    if record.levelno < logging.WARNING or not from_saver:
      return True
    message = record.getMessage()
    error = record.exc_info[1] if record.exc_info else None
    return not (any(t in message for t in TEXTS) or
                (error is not None and io_errno(error) is not None) or
                'background save thread' in message or 'Save Finalize thread' in message)


@contextlib.contextmanager
def quiet_write_errors():
  """While active, the logs of refused writes stay out of the output (see above); on the
  way out, unreferenced save futures are collected while the filter still holds."""
  drop = _DropWriteErrorLogs()
  loggers = [logging.getLogger(name) for name in ('absl', 'asyncio')]
  for logger in loggers:
    logger.addFilter(drop)
  try:
    yield
  finally:
    gc.collect()
    for logger in loggers:
      logger.removeFilter(drop)
