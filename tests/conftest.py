"""Test setup: 8 simulated CPU devices and fast compiles (set before jax is imported),
offline HF, a token cache and a compilation cache of this session (removed at exit), tiny
configs, and the runs several modules share."""

import atexit
import contextlib
import os
import pathlib
import shutil
import tempfile
import zlib

_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  _flags += ' --xla_force_host_platform_device_count=8'
# Tests run tiny models: unoptimized CPU code compiles ~2.5x faster and runs fast enough.
if '--xla_backend_optimization_level' not in _flags:
  _flags += ' --xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = _flags.strip()
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_UPDATE_DOWNLOAD_COUNTS', '0')
if 'MOETRAIN_CACHE' not in os.environ:  # text sources are tokenized here, not in ~/.cache.
  os.environ['MOETRAIN_CACHE'] = tempfile.mkdtemp(prefix='moetrain-test-cache-')
  atexit.register(shutil.rmtree, os.environ['MOETRAIN_CACHE'], True)
# One persistent compilation cache for the session (removed at exit), read by this process,
# inherited by the pytest-xdist workers (`-n 2` in the README's command) and every `moetrain`
# subprocess: the many tests that build the same programs again (each train() call jits
# fresh closures; CLI runs of one config) compile them once.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='moetrain-test-jax-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], True)
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'

import pytest  # noqa: E402

from moetrain import config as config_lib  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**overrides):
  """A model small enough to compile and step in seconds on CPU.

  overrides: dotted keys, e.g. tiny_config(**{'model.num_experts': 4}).
  """
  c = config_lib.default_config()
  c.model.vocab_size = 0
  c.model.d_model = 32
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.d_ff = 64
  c.model.num_experts = 4
  c.model.moe.top_k = 2
  c.data.seq_len = 32
  c.data.batch_size = 8
  c.data.max_documents = 40
  c.data.eval_fraction = 0.25
  c.train.steps = 6
  c.train.warmup_steps = 2
  c.train.log_every = 2
  c.train.eval_every = 3
  c.train.eval_batches = 2
  c.train.progress = False
  for key, value in overrides.items():
    config_lib.set_key(c, key, value)
  return c


def seed_of(name: str) -> int:
  """The random seed of a test (or fixture) called `name`: a CRC-32 of it, so a failing
  test's inputs can be replayed by name."""
  return zlib.crc32(name.encode())


@pytest.fixture
def rng(request):
  """A NumPy Generator seeded from the test's node id (`seed_of`); a failing test's report
  shows the seed (section 'rng seed')."""
  import numpy as np
  seed = seed_of(request.node.nodeid)
  request.node.rng_seed = seed
  return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  seed = getattr(item, 'rng_seed', None)
  if report.failed and seed is not None:
    report.sections.append(('rng seed', f'np.random.default_rng({seed})  '
                                        f'# seed_of({item.nodeid!r})'))


@pytest.fixture
def tiny():
  return tiny_config


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory):
  """A tiny run trained 3 steps on 2 expert shards (checkpoints at steps 2 and 3), shared
  by the tests of the commands that read a run (eval, sample)."""
  from moetrain import train
  workdir = tmp_path_factory.mktemp('trained_run')
  cfg = tiny_config(**{'train.steps': 3, 'mesh.data': -1, 'mesh.expert': 2,
                       'checkpoint.every_steps': 2})
  train.train(cfg, workdir, log=lambda *_: None)
  return workdir


@pytest.fixture(scope='session')
def cli_env():
  """Environment of the `moetrain` subprocess runs of tests/cli_runs.py: this checkout first
  on PYTHONPATH (and the session's compilation cache, so that only the first run compiles)."""
  paths = [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + paths))
  env.pop('SLOW_FINALIZE_STEP', None)
  return env


@pytest.fixture(scope='session')
def reference(tmp_path_factory, cli_env):
  """cli_runs' run uninterrupted, as a command: its per-step losses and final arrays. The
  reference of the killed and resumed runs of test_checkpoint and test_cloud_workdir."""
  import cli_runs
  workdir = tmp_path_factory.mktemp('reference') / 'run'
  rc, out = cli_runs.run_cli(cli_env, workdir)
  assert rc == 0, out
  return cli_runs.losses(workdir), cli_runs.final_arrays(workdir, cli_runs.RUN_STEPS)


@pytest.fixture(scope='session')
def one_process_run(tmp_path_factory):
  """The workdir of multihost_runs.ARGS trained in one process on 4 devices: the reference
  the multi-process launchers (local.sh, SLURM, the TPU pod script) must reproduce."""
  from multihost_runs import train_one_process
  return train_one_process(tmp_path_factory.mktemp('one_process'))


@pytest.fixture(scope='session')
def gcs(tmp_path_factory):
  """A local GCS emulator (tests/gcs_emulator.py) for the whole session, with this process's
  environment pointing every GCS client at it (tensorstore reads its URL once per process,
  so there is one emulator per session). Skips, saying why, when it cannot start."""
  import gcs_emulator
  reason = gcs_emulator.unavailable()
  if reason:
    pytest.skip(reason)
  with contextlib.ExitStack() as stack:
    try:
      emulator = stack.enter_context(gcs_emulator.start(tmp_path_factory.mktemp('gcs')))
    except RuntimeError as e:
      pytest.skip(f'the GCS emulator did not start on this machine: {e}')
    patch = stack.enter_context(pytest.MonkeyPatch.context())
    for key, value in emulator.env.items():
      patch.setenv(key, value)
    yield emulator


def assert_close(got, want, dtype, rtol=1e-4, atol=1e-5):
  """Arrays computed in `dtype`: float32 elementwise (rtol, atol); bfloat16 as a whole,
  the error's norm within 1% of the reference's (its rounding gives ~0.3%)."""
  import numpy as np
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if np.dtype(dtype).name == 'bfloat16':
    assert np.linalg.norm(got - want) <= 1e-2 * np.linalg.norm(want)
  else:
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def model_logits(cfg, params: dict, tokens):
  """float32 [B, L, V] logits (eval mode) of the model of `cfg` with flat parameters
  `params` (as `moetrain.interop.params.to_flat` gives them) on int tokens [B, L]."""
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from moetrain.interop import params as params_lib
  from moetrain.model.transformer import Transformer
  model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
  graphdef, abstract, rest = nnx.split(model, nnx.Param, ...)
  model = nnx.merge(graphdef, params_lib.from_flat(abstract, params), rest)
  return np.asarray(model(jnp.asarray(tokens, jnp.int32), train=False)[0])


@pytest.fixture(scope='session')
def analyzed_run(trained_run):
  """`moetrain analyze --workdir=<trained_run> --eval_batches=1` run once as a command on 2
  devices (the run trained on 8): (workdir, what it printed). Shared by the analysis and
  notebook tests."""
  import subprocess
  import sys
  env = dict(os.environ, PYTHONPATH=str(REPO),
             XLA_FLAGS='--xla_force_host_platform_device_count=2 '
                       '--xla_backend_optimization_level=0')
  out = subprocess.run([sys.executable, '-m', 'moetrain.cli', 'analyze',
                        f'--workdir={trained_run}', '--eval_batches=1'], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return trained_run, out.stdout
