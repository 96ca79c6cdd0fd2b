"""Workdirs in a bucket (gs://), against the GCS emulator (tests/gcs_emulator.py): a run
killed with SIGKILL resumes exactly and leaves its metrics and events there, a sweep
writes its table there, the lock and the logs work on objects; and without the gcp extra
a gs:// workdir is one sentence that creates nothing locally.

Every check of the bucket reads it over the emulator's JSON API, not through moetrain's
clients, except the final arrays (read with orbax, as `moetrain` reads them). The
emulator does not enforce ifGenerationMatch, so these tests cannot show that two runs
starting at the same instant exclude each other: only that a lock that exists is seen."""

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from moetrain import checkpoint as checkpoint_lib
from moetrain import metrics as metrics_lib
from moetrain import paths
from moetrain import workdir as workdir_lib
from cli_runs import CLI_OVERRIDES, REPO, RUN_STEPS
from test_gcs_emulator import events

NO_EXTRA = ("import sys\n"
            "sys.modules['gcsfs'] = sys.modules['google.cloud.storage'] = None\n"
            "from moetrain import cli\n"
            "cli.main(['moetrain'] + sys.argv[1:])\n")


def fresh(gcs, name):
  """A new gs:// folder in the emulator's bucket and its object prefix."""
  prefix = f'{name}-{uuid.uuid4().hex[:8]}'
  return gcs.path(prefix), prefix


def records(gcs, prefix: str) -> list[dict]:
  """The metrics records of the run at `prefix`, from its JSONL segments, in order."""
  names = [n for n in gcs.objects(f'{prefix}/{metrics_lib.JSONL}.')
           if n.rsplit('.', 1)[1].isdigit()]
  return [json.loads(line) for n in names for line in gcs.read(n).decode().splitlines()
          if line.strip()]


def bucket_losses(gcs, prefix: str) -> dict:
  """step -> training loss (a resumed run logs some steps again: the last wins)."""
  return {r['step']: r['loss'] for r in records(gcs, prefix) if 'loss' in r}


def moetrain(args, env, cwd, **kwargs):
  return subprocess.Popen([sys.executable, '-m', 'moetrain.cli', *args], env=env, cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          **kwargs)


def train_in_bucket(gcs, env, workdir, prefix, cwd, kill_at_step=None, timeout=300):
  """`moetrain train` of test_checkpoint's run into `workdir`; with `kill_at_step`,
  SIGKILLed once the bucket holds the metrics of that step and a committed checkpoint
  (saves are async: the metrics of a step are uploaded before its save starts). Returns
  (exit code, output)."""
  args = ['train', f'--config={REPO / "configs/tiny.py"}', f'--workdir={workdir}'] + [
      f'--config.{k}={v}' for k, v in CLI_OVERRIDES.items()]
  proc = moetrain(args, {**env, **gcs.env}, cwd)
  deadline = time.time() + timeout

  def reached() -> bool:
    committed = any(n.endswith('/commit_success.txt') and n.count('/') == 3
                    for n in gcs.objects(f'{prefix}/checkpoints/'))
    return committed and max((r['step'] for r in records(gcs, prefix)),
                             default=0) >= kill_at_step

  if kill_at_step is not None:
    while not reached():
      assert proc.poll() is None, 'the run ended before the kill:\n' + proc.stdout.read()
      assert time.time() < deadline, 'timed out waiting for the kill point'
      time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
  out, _ = proc.communicate(timeout=max(1, deadline - time.time()))
  return proc.returncode, out


def test_run_in_a_bucket_killed_resumes_exactly_and_leaves_its_logs(gcs, reference, cli_env,
                                                                     tmp_path):
  workdir, prefix = fresh(gcs, 'run')
  cwd, staging = tmp_path / 'cwd', tmp_path / 'tmp'
  cwd.mkdir()
  staging.mkdir()
  env = dict(cli_env, TMPDIR=str(staging))  # where a killed run leaves its staged logs.
  rc, out = train_in_bucket(gcs, env, workdir, prefix, cwd, kill_at_step=4)
  assert rc == -signal.SIGKILL, out
  assert f'{prefix}/moetrain.lock' in gcs.objects(prefix)  # a killed run leaves its lock.
  assert [p.name[:16] for p in staging.iterdir()] == ['moetrain-staged-']
  rc, out = train_in_bucket(gcs, env, workdir, prefix, cwd)
  assert rc == 0, out
  assert 'which is no longer running; taking the lock over.' in out
  assert 'resuming from the checkpoint at step' in out

  ref_losses, ref_arrays = reference
  assert bucket_losses(gcs, prefix) == ref_losses
  assert sorted(ref_losses) == list(range(1, RUN_STEPS + 1))
  arrays = checkpoint_lib.Checkpointer(workdir).read_arrays(RUN_STEPS)
  assert arrays.keys() == ref_arrays.keys()
  for name in arrays:
    np.testing.assert_array_equal(arrays[name], ref_arrays[name], err_msg=name)

  names = gcs.objects(prefix)
  assert [n for n in names if '/metrics' in n] == [
      f'{prefix}/metrics.jsonl.000001', f'{prefix}/metrics.jsonl.000002']  # one per run.
  event_files = [n for n in names if n.startswith(f'{prefix}/tb/events.out.tfevents.')]
  assert len(event_files) == 2
  logged = {e.step for n in event_files for e in events(gcs.read(n))
            for v in e.summary.value if v.tag == 'loss'}
  assert logged == set(range(1, RUN_STEPS + 1))
  assert json.loads(gcs.read(f'{prefix}/config.json'))['train']['steps'] == RUN_STEPS
  assert f'{prefix}/moetrain.lock' not in names  # released at the end.
  steps = {int(n.split('/')[2]) for n in names if n.startswith(f'{prefix}/checkpoints/')}
  assert steps == {RUN_STEPS - 2, RUN_STEPS}  # checkpoint.keep=2 pruned in the bucket.
  assert list(cwd.iterdir()) == []  # nothing local, no folder named gs:.


def test_sweep_writes_its_table_into_the_bucket(gcs, cli_env, tmp_path):
  """Two seeds of the run above (the same programs: the compilation cache serves them)."""
  workdir, prefix = fresh(gcs, 'sweep')
  overrides = {**CLI_OVERRIDES, 'checkpoint.every_steps': 0}
  args = ['sweep', f'--config={REPO / "configs/tiny.py"}', f'--workdir={workdir}',
          '--sweep=seed=1,2'] + [f'--config.{k}={v}' for k, v in overrides.items()]
  out, _ = moetrain(args, {**cli_env, **gcs.env}, tmp_path).communicate(timeout=600)
  names = gcs.objects(prefix)
  runs = ['seed=1', 'seed=2']
  for name in ['results.md', 'results.csv', 'loss_curves.png', 'final_eval_loss.png'] + [
      f'{run}/summary.json' for run in runs]:
    assert f'{prefix}/{name}' in names, out
  for plot in ('loss_curves.png', 'final_eval_loss.png'):
    assert gcs.read(f'{prefix}/{plot}').startswith(b'\x89PNG\r\n\x1a\n')
  table = gcs.read(f'{prefix}/results.md').decode().splitlines()
  assert table[0].startswith('| run | total params |') and len(table) == 4
  assert table[2:] == [line for line in out.splitlines() if line.startswith('| seed=')]
  rows = {r['run']: r for r in csv.DictReader(
      io.StringIO(gcs.read(f'{prefix}/results.csv').decode()))}
  for run in runs:
    summary = json.loads(gcs.read(f'{prefix}/{run}/summary.json'))
    final = bucket_losses(gcs, f'{prefix}/{run}')[RUN_STEPS]
    assert float(rows[run]['train_loss']) == summary['final_loss'] == final
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('command,args', [
    ('train', ['--config=configs/tiny.py']),
    ('train', []),  # resuming with the config the run saved in the bucket.
    ('sweep', ['--config=configs/tiny.py', '--sweep=model.num_experts=2,4']),
    ('report', []), ('eval', []), ('sample', ['--prompt=def'])])
def test_bucket_without_the_extra_is_one_sentence_and_creates_nothing(command, args,
                                                                       tmp_path):
  """gcsfs and google-cloud-storage made unimportable in the child: what a venv without
  the gcp extra sees."""
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  env = dict(os.environ, PYTHONPATH=str(REPO))
  out = subprocess.run([sys.executable, '-c', NO_EXTRA, command, '--workdir=gs://bucket/run',
                        *[a.replace('configs/', f'{REPO}/configs/') for a in args]],
                       env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and out.stdout == ''
  assert out.stderr == ('moetrain: gs://bucket/run is in Google Cloud Storage, which needs '
                        'the gcp extra (gcsfs, google-cloud-storage not installed): pip '
                        'install "moetrain[gcp]" (or ".[gcp]" in a checkout).\n')
  assert list(cwd.iterdir()) == []


def test_other_schemes_are_one_sentence():
  with pytest.raises(paths.ConfigError, match=r'^s3://b/run is a s3:// path, and moetrain '
                     r'reads and writes local folders and gs:// buckets only; use one of '
                     r'those\.$'):
    paths.path('s3://b/run')


def test_lock_in_a_bucket(gcs):
  """Refuses a second run naming the holder, takes over a dead holder's lock, releases;
  with a generation precondition on every create and delete (unenforced here)."""
  workdir, prefix = fresh(gcs, 'lock')
  me = workdir_lib.acquire(workdir)
  assert json.loads(gcs.read(f'{prefix}/moetrain.lock')) == me
  with pytest.raises(workdir_lib.WorkdirError, match=(
      f'^{workdir} is in use by another moetrain run \\(pid {os.getpid()} on host ')):
    workdir_lib.acquire(workdir)
  workdir_lib.release(workdir, me)
  assert gcs.objects(prefix) == []

  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  stale = dict(host=socket.gethostname(), pid=dead.pid, started='2026-11-29T10:00:00')
  paths.write_text(f'{workdir}/moetrain.lock', json.dumps(stale))
  logs = []
  me = workdir_lib.acquire(workdir, log=logs.append)
  assert logs == [f'warning: {workdir}/moetrain.lock was held by pid {dead.pid} on host '
                  f'{socket.gethostname()}, started 2026-11-29T10:00:00, which is no longer '
                  'running; taking the lock over.']
  assert json.loads(gcs.read(f'{prefix}/moetrain.lock')) == me
  workdir_lib.release(workdir, dict(me, pid=-1))  # not ours: stays.
  assert gcs.objects(prefix) == [f'{prefix}/moetrain.lock']
  workdir_lib.release(workdir, me)
  assert gcs.objects(prefix) == []


def write_random(writer, rng, steps, flush=False):
  """Logs random scalars and a histogram at `steps` (flushing after each if `flush`);
  returns the JSONL records expected."""
  expected = []
  for step in steps:
    loss, load_E = float(rng.normal()), rng.random(4).astype(np.float32)
    writer.write(step, {'loss': loss, 'moe/layer0/load': load_E})
    if flush:
      writer.flush()
    expected.append({'step': step, 'loss': loss, 'moe/layer0/load': load_E.tolist()})
  return expected


@pytest.mark.parametrize('where', ['bucket', 'local'])
def test_staged_metrics_segments_roll_and_read_back_in_order(where, request, tmp_path, rng):
  """Logs staged and uploaded whole (a bucket's way; `staged=True` on a local folder
  too): a flush uploads what was written, a new segment and event file start past
  segment_bytes, a resumed writer starts the next segment, read_jsonl reads all."""
  if where == 'bucket':
    gcs = request.getfixturevalue('gcs')
    workdir, prefix = fresh(gcs, 'metrics')
    listing = lambda: [n[len(prefix) + 1:] for n in gcs.objects(prefix)]
  else:
    workdir = tmp_path / 'run'
    listing = lambda: sorted(str(p.relative_to(workdir)) for p in workdir.rglob('*')
                             if p.is_file())
  writer = metrics_lib.MetricWriter(workdir, enabled=True, staged=True, sync_seconds=1e9,
                                    segment_bytes=600)
  expected = write_random(writer, rng, [1, 2])
  assert listing() == []  # staged: nothing uploaded before a flush.
  writer.flush()
  assert metrics_lib.read_jsonl(f'{workdir}/metrics.jsonl') == expected
  expected += write_random(writer, rng, range(3, 13), flush=True)
  writer.close()
  resumed = metrics_lib.MetricWriter(workdir, enabled=True, staged=True, segment_bytes=600)
  expected += write_random(resumed, rng, [12, 13])
  resumed.close()
  names = listing()
  segments = [n for n in names if n.startswith('metrics.jsonl.')]
  assert len(segments) >= 3 and segments == [f'metrics.jsonl.{i:06d}'
                                             for i in range(1, len(segments) + 1)]
  assert metrics_lib.read_jsonl(f'{workdir}/metrics.jsonl') == expected
  assert len([n for n in names if n.startswith('tb/events.out.tfevents.')]) >= 3
  assert metrics_lib.next_segment(f'{workdir}/metrics.jsonl') == len(segments) + 1


def test_prepared_data_in_a_bucket_is_one_sentence(tmp_path, monkeypatch):
  """Prepared token files are memory-mapped: `data prepare` refuses a bucket, creating
  nothing."""
  from moetrain import config as config_lib
  from moetrain.data import prepare
  monkeypatch.chdir(tmp_path)
  with pytest.raises(config_lib.ConfigError, match=(
      r'^--output=gs://b/tokens is in a bucket, but prepared token files are memory-mapped '
      r'from a local disk; prepare into a local folder \(or one every host mounts\)\.$')):
    prepare.prepare(config_lib.default_config(), 'gs://b/tokens')
  assert list(tmp_path.iterdir()) == []
