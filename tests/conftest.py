"""Test setup: 8 simulated CPU devices and fast compiles (set before jax is imported),
offline HF, a token cache of this session (removed at exit), tiny configs."""

import atexit
import os
import shutil
import tempfile

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

import pytest  # noqa: E402

from moetrain import config as config_lib  # noqa: E402


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


@pytest.fixture
def tiny():
  return tiny_config
