"""The notebooks run top to bottom on a real (tiny) training run and report its numbers."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from moetrain import metrics as metrics_lib
from moetrain import train

from conftest import tiny_config

NOTEBOOKS = pathlib.Path(__file__).parents[1] / 'notebooks'


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  cfg = tiny_config(**{'train.steps': 4, 'train.log_every': 1, 'mesh.data': -1,
                       'mesh.expert': 2})
  train.train(cfg, workdir, log=lambda *_: None)
  return workdir


def execute(name, workdir, monkeypatch):
  monkeypatch.setenv('MOETRAIN_WORKDIR', str(workdir))
  monkeypatch.setenv('PYTHONPATH', str(NOTEBOOKS.parent) + os.pathsep +
                     os.environ.get('PYTHONPATH', ''))
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  NotebookClient(nb, timeout=300, kernel_name='python3',
                 resources={'metadata': {'path': str(workdir)}}).execute()
  return nb


def outputs(nb, output_type='stream'):
  return [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs
          if o.output_type == output_type]


def test_routing_analysis(run_dir, monkeypatch):
  nb = execute('routing_analysis.ipynb', run_dir, monkeypatch)
  text = ''.join(o.text for o in outputs(nb))
  last = [r for r in metrics_lib.read_jsonl(run_dir / 'metrics.jsonl') if 'loss' in r][-1]
  assert '4 logged steps, MoE layers [0, 1], 4 experts, top-2' in text
  for layer in (0, 1):
    assert (f'layer {layer}: max/mean load '
            f'{last[f"moe/layer{layer}/load_max_over_mean"]:.3f}') in text
  assert len(outputs(nb, 'display_data')) == 2  # the load heatmap and the curves.
