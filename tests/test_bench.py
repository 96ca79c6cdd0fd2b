"""The performance harness's pieces on tiny configs: the FLOP formula against
moetrain.counting, the HLO all-to-all byte parser against programs of known size, a timed
train step, and the JSON / table output. Behaviour only, never wall-clock values."""

import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import configs, gpu_check, harness  # noqa: E402
from moetrain import counting  # noqa: E402

from conftest import tiny_config  # noqa: E402


def resolved(**kw):
  cfg = tiny_config(**kw)
  cfg.model.vocab_size = 256
  return cfg


@pytest.mark.parametrize('overrides', [
    {}, {'model.num_experts': 0}, {'model.tie_embeddings': False},
    {'model.moe.num_shared_experts': 1, 'model.moe.d_expert': 48},
    {'model.moe.router': 'expert_choice', 'model.moe.capacity_factor': 1.5},
    {'model.moe.router': 'soft'}, {'model.first_k_dense': 1},
])
def test_flops_formula_matches_counting(overrides):
  cfg = resolved(**overrides)
  assert harness.flops_per_token(cfg) == counting.count(cfg).flops_per_token
  tokens = cfg.data.batch_size * cfg.data.seq_len
  assert harness.flops_per_step(cfg) == tokens * harness.flops_per_token(cfg)


def test_flops_formula_by_hand():
  """d=32, 2 layers of 4 heads / 2 kv heads of 8, E=4 k=2 experts of 64, vocab 256."""
  cfg = resolved()
  attn = 32 * (4 + 2 * 2) * 8 + 4 * 8 * 32
  moe = 32 * 4 + 2 * 3 * 32 * 64
  n = 2 * (attn + moe) + 32 * 256
  assert harness.matmul_params(cfg.model) == n
  assert harness.flops_per_token(cfg) == 6 * n + 12 * 2 * 32 * 32


def test_bench_configs_share_active_parameters():
  dense, moe8, moe64 = (f() for f in (configs.dense, configs.moe8, configs.moe64))
  assert dense.model.d_model >= 256
  ffn = lambda c: harness.matmul_params(c.model) - c.model.num_layers * c.model.d_model * \
      c.model.num_experts
  assert ffn(dense) == ffn(moe8) == ffn(moe64)


def test_shape_bytes_and_hlo_line_forms():
  assert harness.shape_bytes('f32[8,16]{1,0}') == 512
  assert harness.shape_bytes('(bf16[4,2]{1,0}, s32[3]{0})') == 16 + 12
  assert harness.shape_bytes('f32[]') == 4
  text = '\n'.join([
      '  %a = f32[8,4,16]{2,1,0} all-to-all(f32[8,4,16]{2,1,0} %x), dimensions={0}',
      '  %b = (bf16[2,3]{1,0}, bf16[2,3]{1,0}) all-to-all(%y, %z), replica_groups={}',
      '  %c = ((f32[4]{0}), f32[4]{0}) all-to-all-start(f32[4]{0} %w)',
      '  %d = f32[4]{0} all-to-all-done(%c)',
      '  %e = f32[8,4,16]{2,1,0} all-gather(%x), dimensions={0}',
  ])
  count, total = harness.all_to_all_bytes(text)
  assert count == 3
  assert total == 8 * 4 * 16 * 4 + 2 * 2 * 3 * 2 + 16


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_all_to_all_bytes_of_a_compiled_program(dtype):
  mesh = jax.make_mesh((8,), ('expert',), axis_types=(jax.sharding.AxisType.Explicit,))
  x = jax.device_put(jnp.ones((64, 4, 16), dtype), NamedSharding(mesh, P('expert')))

  def local(x):  # local [8, 4, 16]: there and back again.
    y = jax.lax.all_to_all(x, 'expert', 0, 1, tiled=True)
    return jax.lax.all_to_all(y * 2, 'expert', 1, 0, tiled=True)

  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P('expert'), out_specs=P('expert')))
  count, total = harness.all_to_all_bytes(f.lower(x).compile().as_text())
  assert count == 2
  # XLA:CPU widens bf16 all-to-all to f32 (convert before and after): the parser reports
  # the bytes the compiled program moves, not the source dtype's.
  itemsize = 4 if jax.default_backend() == 'cpu' else jnp.dtype(dtype).itemsize
  assert total == 2 * 8 * 4 * 16 * itemsize


def test_train_step_all_to_all_is_the_minimum_at_capacity_one():
  """4 experts over mesh expert=4 (x data=2), capacity factor 1: every buffer row is one
  token's assignment, forward and backward."""
  cfg = resolved(**{'model.moe.capacity_factor': 1.0, 'mesh.expert': 4})
  b = harness.StepBench('tiny_ep4', cfg)
  count, total = harness.all_to_all_bytes(b.hlo_text())
  assert count == 4 * cfg.model.num_layers
  assert total == harness.min_all_to_all_bytes(cfg, 8, 4)
  tokens_local = cfg.data.batch_size * cfg.data.seq_len // 8
  assert total == 4 * 2 * tokens_local * 2 * cfg.model.d_model * 4


def test_step_bench_result_and_output(tmp_path):
  cfg = resolved()
  b = harness.StepBench('tiny', cfg, devices=jax.devices()[:1])
  metrics = b.run(1, record=False)
  assert np.isfinite(float(metrics['loss']))
  for _ in range(2):
    b.run_round(2, matmul_flops_per_s=1e9)
  r = b.result()
  assert len(r['step_s_all']) == 4 and len(r['rounds']) == 2
  assert r['tokens_per_step'] == cfg.data.batch_size * cfg.data.seq_len
  assert r['model_flops_per_step'] == harness.flops_per_step(cfg)
  assert r['mfu'] > 0 and math.isclose(r['tokens_per_s'], r['tokens_per_step'] / r['step_s'])
  assert harness.paired_ratio(r, r) == 1.0

  result = dict(backend='cpu', devices=1,
                matmul=dict(n=64, dtype='float32', flops_per_s=1e9, all=[1e9]),
                configs=[r], all_to_all=None,
                ratios=dict(R1=harness.ratio('a', 1.1, '<=1.25'),
                            R3=harness.ratio('b', 0.4, '>=0.5'),
                            R4=harness.ratio('c', None, '<=1.25')))
  assert [v['ok'] for v in result['ratios'].values()] == [True, False, None]
  path = harness.write_json(result, tmp_path / 'sub' / 'r.json')
  assert json.loads(path.read_text()) == json.loads(json.dumps(result))
  text = harness.table(result)
  assert 'tiny' in text and '1.0 GFLOP/s' in text
  lines = {line.split()[0]: line for line in text.splitlines() if line[:2] in ('R1', 'R3', 'R4')}
  assert lines['R1'].endswith('ok') and lines['R3'].endswith('MISSED')
  assert lines['R4'].endswith('n/a')


def test_1b_configs_sizes_and_equal_active_parameters():
  """The issue-17 GPU sizes: ~1B parameters for E=8 top-2, equal active parameters for the
  fine-grained E=64 top-8 and the dense model, bf16 compute over f32 weights."""
  counts = {name: counting.count(configs.CONFIGS[name]())
            for name in ('dense_1b', 'moe8_1b', 'moe64_1b')}
  assert 0.9e9 < counts['moe8_1b'].total < 1.1e9
  assert counts['moe64_1b'].total > counts['moe8_1b'].total
  matmul = [c.matmul_active for c in counts.values()]
  assert max(matmul) / min(matmul) < 1.01  # only the routers differ
  for name in configs.CONFIGS_1B:
    cfg = configs.CONFIGS[name]()
    assert (cfg.model.dtype, cfg.model.param_dtype) == ('bfloat16', 'float32')
    assert cfg.data.seq_len == 2048 and cfg.model.d_model == 2048
  moe64 = configs.CONFIGS['moe64_1b']().model
  assert (moe64.num_experts, moe64.moe.top_k) == (64, 8)
  tokamax = configs.CONFIGS['moe8_1b_tokamax']().model.moe
  assert tokamax.dropless and tokamax.grouped_matmul == 'tokamax'


def test_peak_flops_by_device_kind():
  assert harness.peak_flops('NVIDIA H100 80GB HBM3') == 989.4e12
  assert harness.peak_flops('NVIDIA H100 PCIe') == 756e12
  assert harness.peak_flops('NVIDIA H200') == 989.4e12
  assert harness.peak_flops('TPU v5 lite') == 197e12
  assert harness.peak_flops('TPU v5') == 459e12
  assert harness.peak_flops('cpu') is None


def test_run_sequential_1b_family_ratios(tmp_path, monkeypatch):
  """bench/run.py --mode=sequential on the 1B family shrunk to a tiny size: every config
  is timed, G3/G4 and the dropless variants' ratios are computed, G1/G2 (MFU against a
  datasheet peak) are n/a on CPU."""
  from bench import run
  tiny = {'model.vocab_size': 256, 'model.d_model': 64, 'model.num_layers': 1,
          'model.num_heads': 2, 'model.num_kv_heads': 1, 'model.d_ff': 64,
          'model.dtype': 'float32', 'data.seq_len': 32, 'data.batch_size': 8}
  monkeypatch.setattr(configs, 'SIZE_1B', {**configs.SIZE_1B, **tiny})
  monkeypatch.setattr(configs, 'SHAPES_1B', {8: (2, 32), 64: (8, 8)})
  names = 'moe8_1b,moe64_1b,moe8_1b_dropless,moe8_1b_dropless_ragged'
  out = tmp_path / 'r.json'
  run.main([f'--configs={names}', '--mode=sequential', '--rounds=2', '--steps=1',
            '--warmup=1', '--no-a2a', '--matmul-n=64', '--out', str(out)])
  result = json.loads(out.read_text())
  assert [r['config'] for r in result['configs']] == names.split(',')
  assert all(len(r['rounds']) == 2 and r['mfu_peak'] is None and r['step_memory_bytes'] > 0
             for r in result['configs'])
  ratios = result['ratios']
  assert set(ratios) == {'G1', 'G2', 'G3', 'G4', 'moe8_1b_dropless_ragged/moe8_1b'}
  assert ratios['G1']['value'] is None and ratios['G1']['ok'] is None
  assert ratios['G3']['value'] > 0 and ratios['G4']['value'] > 0
  by = {r['config']: r for r in result['configs']}
  assert ratios['G3']['value'] == harness.paired_ratio(by['moe64_1b'], by['moe8_1b'])
  with pytest.raises(SystemExit, match='unknown moe9'):
    run.main(['--configs=moe9', '--no-a2a'])


def test_set_overrides_every_config(monkeypatch):
  monkeypatch.setattr(configs, 'SET', {})
  configs.set_size(configs.D_MODEL, configs.BATCH_SIZE, 'float32',
                   ['data.batch_size=8', 'model.remat=full'])
  try:
    for name in ('moe8', 'moe64_1b'):
      cfg = configs.CONFIGS[name]()
      assert (cfg.data.batch_size, cfg.model.remat) == (8, 'full')
    with pytest.raises(Exception, match="--set value 'x' for data.batch_size is not a int"):
      configs.set_size(configs.D_MODEL, configs.BATCH_SIZE, 'float32', ['data.batch_size=x'])
  finally:
    configs.set_size(configs.D_MODEL, configs.BATCH_SIZE, 'float32')


def test_gpu_check_passes_every_check_this_backend_has(capsys):
  """bench/gpu_check.py at tiny sizes: every check that runs here passes (on CPU: the
  grouped matmuls of jax.lax.ragged_dot, tokamax's 'xla' implementation and the cuDNN-flag
  subprocess, and the local layers), and the rest say why they are not available."""
  gpu_check.RESULTS.clear()
  assert gpu_check.main(['--tiny']) == 0
  out = capsys.readouterr().out
  checks = [line for line in out.splitlines() if line.startswith(('ok', 'FAIL'))]
  assert len(checks) == len(gpu_check.RESULTS) and f'{len(checks)}/{len(checks)} checks ' \
      'passed' in out
  for dtype in ('float32', 'bfloat16'):
    for path in ('jax.lax.ragged_dot', "tokamax.ragged_dot implementation='xla'"):
      for what in ('output, used rows', 'd x', 'd w_gate', 'd w_up', 'd w_down'):
        assert f'ok   {path} == padded: {what} ({dtype})' in out
    assert 'ok   local tokamax == padded: d w_down (' + dtype in out
  assert 'ok   jax.lax.ragged_dot + cuDNN flag == padded: d x (bfloat16)' in out or \
      'does not know the flag' in out
  if jax.default_backend() == 'cpu':
    assert "--   tokamax.ragged_dot implementation='mosaic' (bfloat16)" in out
    assert 'EP ragged a2a + tokamax (bfloat16, k=2)' in out and 'no ragged all-to-all' in out


def test_gpu_check_says_whether_jaxlib_knows_an_xla_flag():
  assert gpu_check.main(['--has-xla-flag', '--xla_force_host_platform_device_count']) == 0
  assert gpu_check.main(['--has-xla-flag', 'xla_cpu_no_such_flag_at_all']) == 1
