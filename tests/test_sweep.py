"""Sweeps: a grid of overrides trains into one folder per run, then a table and plots."""

import csv
import json
import os
import signal

import numpy as np
import pytest

from moetrain import metrics as metrics_lib
from moetrain import sweep as sweep_lib
from moetrain.config import ConfigError

from conftest import tiny_config

AXES = ['model.num_experts=2,4', 'model.moe.top_k=1']


@pytest.fixture(scope='module')
def swept(tmp_path_factory):
  """The sweep, stopped by a SIGTERM as its first run starts training, then the same
  command again. Returns (workdir, base config, rows, lines of the second call, lines of
  the first)."""
  workdir = tmp_path_factory.mktemp('sweep')
  base = tiny_config(**{'train.steps': 4, 'train.eval_every': 2, 'mesh.data': -1,
                        'mesh.expert': 2, 'model.vocab_size': 384})
  base.unlock()
  stopped = []

  def log_and_signal(line):
    stopped.append(line)
    if line.startswith('training '):  # the first run's loop is about to start.
      os.kill(os.getpid(), signal.SIGTERM)

  assert sweep_lib.sweep(base, AXES, workdir, log=log_and_signal) is None
  lines = []
  rows = sweep_lib.sweep(base, AXES, workdir, log=lines.append)
  return workdir, base, rows, lines, stopped


def test_a_signal_stops_the_whole_sweep_and_the_same_command_resumes_it(swept):
  workdir, _, _, lines, stopped = swept
  first, second = 'num_experts=2,top_k=1', 'num_experts=4,top_k=1'
  assert stopped[-1] == (f'sweep stopped by SIGTERM at run {first}; run the same command '
                         'again to resume it.')
  assert any(line.startswith('SIGTERM received: saving a checkpoint at step 1') for line in
             stopped)
  assert not any(line.startswith(f'[2/2] {second}') for line in stopped)
  assert lines[0] == f'[1/2] {first}' and 'resuming from the checkpoint at step 1' in lines
  assert f'[2/2] {second}' in lines
  steps = [r['step'] for r in metrics_lib.read_jsonl(workdir / first / 'metrics.jsonl')
           if 'loss' in r]
  assert steps == [2, 4] and not (workdir / 'moetrain.lock').exists()


def test_grid_parses_types_and_names_runs():
  base = tiny_config()
  runs = sweep_lib.grid(base, ['model.num_experts=4,8', 'model.moe.capacity_factor=1.0,2',
                               'model.moe.dropless=true'])
  assert [name for name, _ in runs] == [
      'num_experts=4,capacity_factor=1.0,dropless=True',
      'num_experts=4,capacity_factor=2.0,dropless=True',
      'num_experts=8,capacity_factor=1.0,dropless=True',
      'num_experts=8,capacity_factor=2.0,dropless=True']
  cfg = runs[3][1]
  assert cfg.model.num_experts == 8 and cfg.model.moe.capacity_factor == 2.0
  assert isinstance(cfg.model.moe.capacity_factor, float) and cfg.model.moe.dropless is True
  assert base.model.num_experts == 4  # the base config is untouched.


@pytest.mark.parametrize('axes,message', [
    (['model.num_expert=4,8'], "unknown config key 'model.num_expert'"),
    (['model.num_experts'], 'has no values'),
    (['model.num_experts=four'], "'four' for model.num_experts is not a int"),
    (['model.moe.top_k=1,8'], r'sweep run top_k=8: model\.moe\.top_k=8 is larger'),
    (['model.moe.top_k=1', 'model.moe.top_k=2'], 'appears twice'),
    (['mesh.expert=2,3'], r'sweep run expert=3: mesh\.expert=3 does not divide the 8 devices'),
])
def test_bad_sweeps_fail_before_training(axes, message):
  with pytest.raises(ConfigError, match=message):
    sweep_lib.grid(tiny_config(), axes)


def test_sweep_trains_each_run_and_writes_table_and_plots(swept):
  workdir, _, rows, lines, _ = swept
  assert [r['run'] for r in rows] == ['num_experts=2,top_k=1', 'num_experts=4,top_k=1']
  for row in rows:
    run = workdir / row['run']
    config = json.loads((run / 'config.json').read_text())
    assert config['model']['num_experts'] == int(row['run'].split(',')[0].split('=')[1])
    evals = [r for r in metrics_lib.read_jsonl(run / 'metrics.jsonl') if 'eval/loss' in r]
    assert row['eval_loss'] == pytest.approx(evals[-1]['eval/loss'])
    assert row['eval_bits_per_byte'] == pytest.approx(evals[-1]['eval/bits_per_byte'])
    # Byte tokens: bits per byte is the loss in bits over the non-end-of-document targets.
    assert evals[-1]['eval/bits_per_byte'] > evals[-1]['eval/loss'] / np.log(2)
  assert rows[1]['total_params'] > rows[0]['total_params']
  # Top-1 of equal experts: only the router's two extra columns per layer are added.
  assert rows[1]['active_params'] - rows[0]['active_params'] == 2 * 32 * 2
  with open(workdir / 'results.csv') as f:
    table = list(csv.DictReader(f))
  assert [t['run'] for t in table] == [r['run'] for r in rows]
  md = (workdir / 'results.md').read_text().splitlines()
  assert md[0].startswith('| run |') and len(md) == 2 + len(rows) and 'bits/byte' in md[0]
  assert md == lines[-len(md):]
  for png in ('loss_curves.png', 'final_eval_loss.png'):
    assert (workdir / png).read_bytes()[:4] == b'\x89PNG'


def test_rerun_keeps_finished_runs(swept):
  workdir, base, rows, _, _ = swept
  before = {r['run']: (workdir / r['run'] / 'metrics.jsonl').read_text() for r in rows}
  lines = []
  again = sweep_lib.sweep(base, AXES, workdir, log=lines.append)
  assert sum('finished earlier, kept' in line for line in lines) == 2
  assert again == rows
  assert before == {r['run']: (workdir / r['run'] / 'metrics.jsonl').read_text()
                    for r in rows}


def test_report_of_an_empty_folder_is_one_sentence(tmp_path):
  with pytest.raises(ConfigError, match='holds no finished runs'):
    sweep_lib.report(tmp_path)
