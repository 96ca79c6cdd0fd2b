"""The workdir: one run at a time (the lock), and one sentence when the filesystem refuses a
write (disk full, read-only, no permission), with the checkpoints saved before intact."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest

from moetrain import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def other_process():
  """A live process that is not this one (its pid and start ticks)."""
  proc = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  yield proc.pid, workdir_lib.process_start_ticks(proc.pid)
  proc.kill()
  proc.wait()


def write_lock(workdir, **info):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / workdir_lib.LOCK).write_text(json.dumps(info))


def test_lock_names_its_holder_and_goes_on_release(tmp_path):
  me = workdir_lib.acquire(tmp_path / 'run')
  saved = json.loads((tmp_path / 'run' / workdir_lib.LOCK).read_text())
  assert saved == me and saved['pid'] == os.getpid() and saved['host'] == socket.gethostname()
  workdir_lib.release(tmp_path / 'run', me)
  assert not (tmp_path / 'run' / workdir_lib.LOCK).exists()


def test_second_run_refuses_naming_the_holder(tmp_path, other_process):
  pid, ticks = other_process
  write_lock(tmp_path, host=socket.gethostname(), pid=pid, start_ticks=ticks,
             started='2026-11-29T10:00:00')
  with pytest.raises(workdir_lib.WorkdirError) as e:
    workdir_lib.acquire(tmp_path)
  assert str(e.value) == (f'{tmp_path} is in use by another moetrain run (pid {pid} on host '
                          f'{socket.gethostname()}, started 2026-11-29T10:00:00); wait for it '
                          'to end or choose another --workdir.')


def test_lock_of_another_host_refuses_and_says_how_to_clear_it(tmp_path):
  write_lock(tmp_path, host='elsewhere', pid=1, started='2026-11-29T10:00:00')
  with pytest.raises(workdir_lib.WorkdirError, match=r'\(pid 1 on host elsewhere, started '
                     r'.*\); wait for it to end or choose another --workdir; if that run is '
                     r'gone, delete .*moetrain\.lock\.$'):
    workdir_lib.acquire(tmp_path)


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, other_process):
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  pid, ticks = other_process
  for stale in (dict(pid=dead.pid),  # the holder is gone,
                dict(pid=pid, start_ticks=ticks + 1)):  # or its pid now names another process.
    write_lock(tmp_path, host=socket.gethostname(), started='2026-11-29T10:00:00', **stale)
    logs = []
    me = workdir_lib.acquire(tmp_path, log=logs.append)
    assert logs == [f'warning: {tmp_path / workdir_lib.LOCK} was held by pid {stale["pid"]} '
                    f'on host {socket.gethostname()}, started 2026-11-29T10:00:00, which is no '
                    'longer running; taking the lock over.']
    assert json.loads((tmp_path / workdir_lib.LOCK).read_text()) == me
    workdir_lib.release(tmp_path, me)


@pytest.mark.parametrize('errno_name,words', [('ENOSPC', 'the disk is full; free space'),
                                              ('EROFS', 'its filesystem is read-only'),
                                              ('EACCES', 'permission is denied')])
def test_refused_writes_are_recognised_inside_wrapped_errors(errno_name, words):
  """orbax and TensorStore hand a refused write on as ValueError text or as the cause."""
  import errno
  number = getattr(errno, errno_name)
  wrapped = ValueError(f'RESOURCE_EXHAUSTED: Error writing "x": {os.strerror(number)} '
                       f"[os_error_code='{number}']")
  try:
    try:
      raise OSError(number, os.strerror(number))
    except OSError as e:
      raise RuntimeError('save failed') from e
  except RuntimeError as e:
    chained = e
  for error in (wrapped, chained):
    assert workdir_lib.io_errno(error) == number
    sentence = workdir_lib.os_error_sentence(error, '/runs/x')
    assert sentence.startswith(f'could not write to /runs/x because {words}')
  assert workdir_lib.io_errno(ValueError('shape mismatch')) is None
  assert workdir_lib.refused_write_in(OSError(number, 'x', '/runs/x/metrics.jsonl'), '/runs/x')
  assert not workdir_lib.refused_write_in(OSError(number, 'x', '/data/a.jsonl'), '/runs/x')


# --------------------------------------------------------------------------------------
# The real thing, through the CLI: a small tmpfs that fills up, a read-only remount, a
# directory without write permission.

ARGS = ['--config.model.d_model=16', '--config.model.num_layers=1',
        '--config.model.num_heads=2', '--config.model.num_kv_heads=1', '--config.model.d_ff=32',
        '--config.model.num_experts=4', '--config.data.seq_len=16', '--config.data.batch_size=8',
        '--config.data.max_documents=40', '--config.data.eval_fraction=0.25',
        '--config.train.log_every=1', '--config.train.eval_every=100',
        '--config.train.eval_batches=1', '--config.train.warmup_steps=2',
        '--config.train.progress=False', '--config.checkpoint.every_steps=2',
        '--config.checkpoint.keep=2']

SCRIPT = '''
set -u
mount -t tmpfs -o size=3m tmpfs "$MNT"
train() {  # train STEPS LOG
  "$PY" -m moetrain.cli train --config="$REPO/configs/tiny.py" --workdir="$MNT/run" $ARGS \\
      --config.train.steps=$1 > "$OUT/$2.log" 2>&1
  echo $? > "$OUT/$2.rc"
}
readable() {  # every checkpoint reads back whole (checksums verified)
  "$PY" -c "from moetrain import checkpoint as c; k = c.Checkpointer('$MNT/run'); \\
print(*[s for s in k.steps() if k.read_arrays(s)])" > "$OUT/$1.steps" 2>&1
}
train 4 first
avail=$(df -k --output=avail "$MNT" | tail -1)
fallocate -l $(( (avail - 64) * 1024 )) "$MNT/filler"
train 8 full
readable after_full
rm "$MNT/filler"
mount --bind "$MNT/run" "$MNT/run" && mount -o remount,bind,ro "$MNT/run"
train 8 readonly
readable after_readonly
umount "$MNT/run"
train 8 resumed
'''


def mount_namespace() -> list[str] | None:
  """A command prefix that runs a shell where mounting a tmpfs is allowed and invisible to
  the rest of the machine (a private mount namespace), or None where there is none."""
  for prefix in (['unshare', '-rm'], ['unshare', '-m']):
    if shutil.which('unshare') and subprocess.run(
        [*prefix, 'true'], capture_output=True).returncode == 0:
      return prefix
  return None


def cli_env(tmp_path, devices=2):
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} '
                        '--xla_backend_optimization_level=0',
              JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def after_training_starts(log: str) -> list[str]:
  lines = log.strip().splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith('training '))
  return lines[start + 1:]


def test_disk_full_and_read_only_are_one_sentence_and_keep_the_checkpoints(tmp_path):
  prefix = mount_namespace()
  if prefix is None:
    pytest.skip('no private mount namespace here (unshare -m) to mount a small tmpfs in')
  (tmp_path / 'mnt').mkdir()
  out = tmp_path / 'out'
  out.mkdir()
  env = dict(cli_env(tmp_path), MNT=str(tmp_path / 'mnt'), OUT=str(out), PY=sys.executable,
             REPO=str(REPO), ARGS=' '.join(ARGS))
  done = subprocess.run([*prefix, 'bash', '-c', SCRIPT], env=env, cwd=REPO, timeout=900,
                        capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  log = {p.stem: p.read_text() for p in out.glob('*.log')}
  rc = {p.stem: int(p.read_text()) for p in out.glob('*.rc')}
  assert rc['first'] == 0, log['first']
  # Disk full at the save of step 6 (resumed from step 4): one sentence, exit 1.
  assert rc['full'] == 1, log['full']
  lines = after_training_starts(log['full'])
  assert 1 <= len(lines) <= 3, log['full']
  assert lines[-1] == (f'moetrain: could not write to {tmp_path / "mnt" / "run"} because the '
                       'disk is full; free space there, then run the same command again to '
                       'resume from the last checkpoint.')
  assert (out / 'after_full.steps').read_text().split() == ['2', '4']
  # Read-only: refused before anything is written.
  assert rc['readonly'] == 1
  assert log['readonly'].strip().splitlines() == [
      f'moetrain: could not write to {tmp_path / "mnt" / "run" / "moetrain.lock"} because its '
      'filesystem is read-only; remount it writable (then run the same command again to '
      'resume from the last checkpoint) or choose another --workdir.']
  assert (out / 'after_readonly.steps').read_text().split() == ['2', '4']
  # Writable again: the same command resumes and finishes.
  assert rc['resumed'] == 0, log['resumed']
  assert 'resuming from the checkpoint at step 4' in log['resumed']
  assert 'final eval loss' in log['resumed']


def test_workdir_without_write_permission_is_one_sentence(tmp_path):
  """As root, permission bits bind only without CAP_DAC_OVERRIDE: drop it for the run."""
  prefix = []
  if os.geteuid() == 0:
    if not shutil.which('setpriv'):
      pytest.skip('running as root without setpriv to drop CAP_DAC_OVERRIDE')
    prefix = ['setpriv', '--bounding-set=-dac_override,-dac_read_search', '--']
  closed = tmp_path / 'closed'
  (closed / 'run').mkdir(parents=True)
  closed.chmod(0o555)
  (closed / 'run').chmod(0o555)
  try:
    for workdir, where in ((closed / 'run', closed / 'run' / 'moetrain.lock'),
                           (closed / 'new', closed / 'new')):
      done = subprocess.run(
          [*prefix, sys.executable, '-m', 'moetrain.cli', 'train',
           f'--config={REPO / "configs/tiny.py"}', f'--workdir={workdir}', *ARGS],
          env=cli_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=300)
      assert done.returncode == 1, done.stderr
      assert done.stderr.strip().splitlines() == [
          f'moetrain: could not write to {where} because permission is denied; make it '
          'writable for this user or choose another --workdir.']
  finally:
    (closed / 'run').chmod(0o755)
    closed.chmod(0o755)
