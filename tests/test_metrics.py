"""Metric logging: routing metrics from layer statistics, TensorBoard + JSONL writing."""

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from moetrain import metrics as metrics_lib


def read_events(directory):
  """(tag, step, summary value) of every value in the TFRecord event files under it."""
  out = []
  for path in sorted(directory.rglob('events.out.tfevents.*')):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      length = int.from_bytes(data[pos:pos + 8], 'little')
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      out += [(v.tag, event.step, v) for v in event.summary.value]
  return out


def test_routing_metrics_match_numpy(rng):
  stats = []
  for _ in range(2):
    load_E = rng.dirichlet(np.ones(8)).astype(np.float32)
    stats.append(dict(load_E=load_E, dropped_frac=rng.random(), router_entropy=rng.random(),
                      max_logit=rng.random(), balance_loss=rng.random(), z_loss=rng.random()))
  stats[1]['bias_norm'] = 0.5
  out = metrics_lib.routing_metrics(stats, [1, 3])
  for layer, s in zip([1, 3], stats):
    p = f'moe/layer{layer}/'
    assert out[p + 'load_max_over_mean'] == pytest.approx(s['load_E'].max() * 8)
    assert out[p + 'load_min_over_mean'] == pytest.approx(s['load_E'].min() * 8)
    for key in ('dropped_frac', 'router_entropy', 'max_logit', 'balance_loss', 'z_loss'):
      assert out[p + key] == s[key]
    np.testing.assert_array_equal(out[p + 'load'], s['load_E'])
  assert 'moe/layer1/bias_norm' not in out and out['moe/layer3/bias_norm'] == 0.5


def test_writer_appends_jsonl_and_writes_tensorboard(tmp_path):
  writer = metrics_lib.MetricWriter(tmp_path, enabled=True)
  writer.write(1, {'loss': np.float32(2.5), 'moe/layer0/load': np.array([0.25, 0.75])})
  writer.close()
  writer = metrics_lib.MetricWriter(tmp_path, enabled=True)  # a resumed run appends.
  writer.write(2, {'loss': 2.0})
  writer.close()
  records = metrics_lib.read_jsonl(tmp_path / 'metrics.jsonl')
  assert records == [{'step': 1, 'loss': 2.5, 'moe/layer0/load': [0.25, 0.75]},
                     {'step': 2, 'loss': 2.0}]
  events = read_events(tmp_path / 'tb')
  assert sorted((step, v.simple_value) for tag, step, v in events if tag == 'loss') == [(1, 2.5),
                                                                                        (2, 2.0)]
  hist = [v.histo for tag, _, v in events if tag == 'moe/layer0/load']
  assert len(hist) == 1 and hist[0].num == 2 and hist[0].sum == pytest.approx(1.0)


def test_disabled_writer_writes_nothing(tmp_path):
  writer = metrics_lib.MetricWriter(tmp_path / 'w', enabled=False)
  writer.write(1, {'loss': 1.0})
  writer.close()
  assert not (tmp_path / 'w').exists()
