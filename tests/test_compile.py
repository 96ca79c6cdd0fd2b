"""`moetrain compile`: slice names to libtpu topologies, collectives read from HLO, the
per-chip report for local devices, and (tests marked libtpu, run by tests/newest_jax.sh)
ahead-of-time compiles for TPU topologies on this CPU host."""

import pytest

from moetrain import compile as compile_lib
from moetrain.config import ConfigError

from conftest import tiny_config
from test_cli import moetrain as run_cli

SMALL = ['--config.model.d_model=64', '--config.model.num_layers=2',
         '--config.model.num_heads=4', '--config.model.num_kv_heads=2',
         '--config.model.d_ff=128', '--config.data.seq_len=128',
         '--config.data.batch_size=8']


def moetrain(*args, devices=8):
  """`moetrain compile ARGS` in a subprocess."""
  return run_cli('compile', *args, devices=devices, timeout=900)


@pytest.mark.parametrize('name,expected', [
    ('v5p-128', 'v5p:4x4x4'), ('v5p-8', 'v5p:2x2x1'), ('v5p-16', 'v5p:2x2x2'),
    ('v5p-32', 'v5p:2x2x4'), ('v5p-256', 'v5p:4x4x8'), ('v4-8', 'v4:2x2x1'),
    ('v4-64', 'v4:2x4x4'), ('v5e-16', 'v5e:4x4'), ('v5e-8', 'v5e:2x4'),
    ('v5litepod-4', 'v5e:2x2'), ('v6e-256', 'v6e:16x16'), ('v6e-1', 'v6e:1x1'),
    ('v5p:4x4x8', 'v5p:4x4x8'),
])
def test_slice_names_map_to_libtpu_topologies(name, expected):
  assert compile_lib.topology_name(name)[0] == expected


@pytest.mark.parametrize('name', ['v5p-12', 'v5p-7', 'v7x-8', 'tpu'])
def test_unknown_slice_names_are_one_sentence(name):
  with pytest.raises(ConfigError, match=rf"--topology='{name}' is not a"):
    compile_lib.topology_name(name)


def test_collectives_are_counted_once_per_op():
  hlo = '\n'.join([
      '  %all-gather-start = (f32[4]) all-gather-start(f32[1] %p), dimensions={0}',
      '  %all-gather-done = f32[4] all-gather-done(%all-gather-start)',
      '  %ag.2 = f32[8,4]{1,0} all-gather(f32[2,4]{1,0} %q), dimensions={0}',
      '  %rs = f32[2]{0} reduce-scatter(f32[8]{0} %g), dimensions={0}',
      '  %a2a = f32[4,2]{1,0} all-to-all(f32[4,2]{1,0} %x), dimensions={0}',
      '  %ar = f32[] all-reduce(f32[] %l), to_apply=%add',
      '  %r = f32[9,2] ragged-all-to-all(%a, %b, %c, %d, %e, %f)',
  ])
  assert compile_lib.count_collectives(hlo) == {
      'all-to-all': 1, 'ragged-all-to-all': 1, 'all-gather': 2, 'reduce-scatter': 1,
      'all-reduce': 1, 'collective-permute': 0}


def test_compile_for_local_devices_reports_per_chip_numbers():
  cfg = tiny_config(**{'mesh.data': 1, 'mesh.fsdp': 4, 'mesh.expert': 2,
                       'model.scan_layers': True, 'model.remat': 'full'})
  report, _ = compile_lib.compile_step(cfg)
  assert report.num_devices == 8 and report.mesh == {'data': 1, 'fsdp': 4, 'expert': 2}
  assert report.argument_bytes > 0 and report.temp_bytes > 0 and report.fits()
  assert report.collectives['all-to-all'] > 0 and report.collectives['all-gather'] > 0
  prepared = compile_lib.prepare(cfg, 8, 'cpu')
  tokens = cfg.data.batch_size * cfg.data.seq_len
  from moetrain import counting
  assert report.model_flops_per_step == counting.count(prepared).flops_per_token * tokens
  text = '\n'.join(report.lines())
  for row in ('arguments (state, batch)', 'temporaries', 'total', 'HBM', 'model FLOPs per step',
              'all-to-all', 'reduce-scatter'):
    assert row in text


def test_compile_command_prints_the_table_for_local_devices():
  out = moetrain('--config=configs/tiny.py', '--config.mesh.data=2', '--config.mesh.fsdp=2',
                 '--config.mesh.expert=2', *SMALL)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'train step compiled for the local cpu devices: 8 x cpu' in out.stdout
  assert 'mesh data=2 x fsdp=2 x expert=2' in out.stdout
  assert 'temporaries' in out.stdout and 'all-to-all' in out.stdout


def test_compile_command_bad_mesh_is_one_sentence():
  out = moetrain('--config=configs/tiny.py', '--config.mesh.fsdp=3', *SMALL)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and 'does not divide the 8 devices' in lines[0], out.stderr


# --------------------------------------------------------------------------------------
# TPU topologies (libtpu; tests/newest_jax.sh runs these in the Python 3.12 venv).

@pytest.mark.libtpu
def test_compile_for_a_v5p_topology_on_this_host():
  """A small MoE with FSDP x expert parallelism, scanned, remat and splash attention,
  compiled for v5p-8 (4 chips): fits, with the collectives of both kinds of sharding."""
  out = moetrain('--config=configs/tiny.py', '--topology=v5p-8', '--config.mesh.data=1',
                 '--config.mesh.fsdp=2', '--config.mesh.expert=2',
                 '--config.model.scan_layers=True', '--config.model.remat=full',
                 '--config.model.attention_impl=auto', '--config.model.loss_chunk=32',
                 '--config.model.dtype=bfloat16', *SMALL)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'train step compiled for v5p-8: 4 x TPU v5, mesh data=1 x fsdp=2 x expert=2' in \
      out.stdout
  assert '95.73 GiB' in out.stdout
  counts = dict(part.rsplit(' ', 1) for part in out.stdout.strip().splitlines()[-1].strip()
                .split(', '))
  assert int(counts['all-to-all']) > 0 and int(counts['all-gather']) > 0
  assert int(counts['reduce-scatter']) > 0


@pytest.mark.libtpu
def test_a_step_that_does_not_fit_says_what_to_change():
  """Whole float32 logits of 64 x 2048 tokens x 32k vocabulary (16.8 GB) on one v5e chip
  (15.75 GiB): exit 1 with one sentence."""
  out = moetrain('--config=configs/tiny.py', '--topology=v5e-1', '--config.mesh.data=1',
                 '--config.model.vocab_size=32000', '--config.data.seq_len=2048',
                 '--config.data.batch_size=64', '--config.model.num_layers=1')
  assert out.returncode == 1, out.stderr[-3000:]
  ours = [l for l in out.stderr.splitlines() if l.startswith('moetrain:')]  # libtpu warns too
  assert len(ours) == 1 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert ours[0].startswith('moetrain: the train step does not fit on v5e-1: ')
  assert "model.remat='full'" in ours[0] and 'model.loss_chunk' in ours[0]


@pytest.mark.libtpu
def test_compile_for_two_slices_puts_data_across_them():
  out = moetrain('--config=configs/tiny.py', '--topology=v5e-4', '--num_slices=2',
                 '--config.mesh.data=2', '--config.mesh.expert=4', *SMALL)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'train step compiled for v5e-4 x 2 slices: 8 x TPU v5 lite, mesh data=2 x fsdp=1 x ' \
      'expert=4' in out.stdout
  bad = moetrain('--config=configs/tiny.py', '--topology=v5e-4', '--num_slices=2',
                 '--config.mesh.data=1', '--config.mesh.expert=8', *SMALL)
  assert bad.returncode == 2
  assert 'mesh.data=1 must be a multiple of the 2 slices' in bad.stderr
