"""The notebooks run top to bottom (in notebooks/, as jupyter runs them) on a real tiny
training run, its analysis and a tiny sweep, report their numbers and leave no error
cells."""

import json
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from moetrain import metrics as metrics_lib
from moetrain import sweep
from moetrain import train
from moetrain.analysis import report

from conftest import tiny_config

NOTEBOOKS = pathlib.Path(__file__).parents[1] / 'notebooks'


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  cfg = tiny_config(**{'train.steps': 4, 'train.log_every': 1, 'mesh.data': -1,
                       'mesh.expert': 2})
  train.train(cfg, workdir, log=lambda *_: None)
  return workdir


@pytest.fixture(scope='module')
def sweep_dir(tmp_path_factory):
  """A sweep of 2-step runs over the number of experts."""
  workdir = tmp_path_factory.mktemp('sweep')
  base = tiny_config(**{'train.steps': 2, 'train.warmup_steps': 1, 'train.eval_every': 2,
                        'train.eval_batches': 1, 'train.log_every': 1})
  sweep.sweep(base, ['model.num_experts=2,4'], workdir, log=lambda *_: None)
  return workdir


def execute(name, monkeypatch, **env):
  """Runs notebooks/`name` in notebooks/ with `env` set; fails on any error cell."""
  for key, value in env.items():
    monkeypatch.setenv(key, str(value))
  monkeypatch.setenv('PYTHONPATH', str(NOTEBOOKS.parent) + os.pathsep +
                     os.environ.get('PYTHONPATH', ''))
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  NotebookClient(nb, timeout=300, kernel_name='python3',
                 resources={'metadata': {'path': str(NOTEBOOKS)}}).execute()
  assert not outputs(nb, 'error')
  return nb


def outputs(nb, output_type='stream'):
  return [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs
          if o.output_type == output_type]


def test_routing_analysis(run_dir, monkeypatch):
  nb = execute('routing_analysis.ipynb', monkeypatch, MOETRAIN_WORKDIR=run_dir)
  text = ''.join(o.text for o in outputs(nb))
  last = [r for r in metrics_lib.read_jsonl(run_dir / 'metrics.jsonl') if 'loss' in r][-1]
  assert '4 logged steps, MoE layers [0, 1], 4 experts, top-2' in text
  for layer in (0, 1):
    assert (f'layer {layer}: max/mean load '
            f'{last[f"moe/layer{layer}/load_max_over_mean"]:.3f}') in text
  assert len(outputs(nb, 'display_data')) == 2  # the load heatmap and the curves.


def test_relative_workdirs_resolve_against_the_repository_root(monkeypatch):
  monkeypatch.chdir(NOTEBOOKS)
  assert report.repository_path('runs/tiny') == NOTEBOOKS.parent / 'runs' / 'tiny'
  assert report.repository_path('/abs/run') == pathlib.Path('/abs/run')


def test_specialization(analyzed_run, monkeypatch):
  workdir, _ = analyzed_run
  nb = execute('specialization.ipynb', monkeypatch, MOETRAIN_WORKDIR=workdir)
  text = ''.join(o.text for o in outputs(nb))
  result = json.loads((workdir / 'analysis' / 'analysis.json').read_text())
  assert f"{workdir} at step 3: {result['tokens']:,} eval tokens" in text
  python_nmi = result['specialization'][1]['schemes']['python']['nmi']
  assert f'layer 1: python NMI {python_nmi:.3f}' in text
  assert 'capacity factor dropless' in text and 'layer 0 -> 1: accuracy' in text
  assert len(outputs(nb, 'display_data')) == 5  # NMI bars, 2 heatmaps, ablation, capacity.


def test_ablation_report(sweep_dir, monkeypatch):
  nb = execute('ablation_report.ipynb', monkeypatch, MOETRAIN_SWEEP=sweep_dir)
  text = ''.join(o.text for o in outputs(nb))
  rows = sweep.read_rows(sweep_dir)
  assert f'{sweep_dir}: 2 finished runs' in text
  assert sorted((r['num_experts'], r['top_k']) for r in rows) == [(2, 2), (4, 2)]
  for r in rows:
    assert f"{r['run']}: max/mean load {r['max_over_mean_load']:.2f}" in text
  assert len(outputs(nb, 'display_data')) == 3
