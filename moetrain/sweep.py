"""Ablation sweeps: a grid of config overrides trained one after another, then a table and
plots of the results.

`moetrain sweep --config=configs/tiny.py --workdir=runs/experts \
    --sweep=model.num_experts=4,8,16 --sweep=model.moe.top_k=1,2`
trains the 6 combinations into `runs/experts/<name>/` and writes `results.md`,
`results.csv`, `loss_curves.png` and `final_eval_loss.png` beside them. SIGTERM or Ctrl-C
stops the whole sweep once the run in progress has saved a checkpoint. A run that already
finished (its `summary.json` exists) is read, not retrained, and an interrupted one
resumes from its checkpoint, so the same command continues a sweep where it stopped;
`moetrain report --workdir=DIR` only rebuilds the table.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import re

from moetrain import config as config_lib
from moetrain import metrics as metrics_lib
from moetrain import paths

SUMMARY = 'summary.json'


def parse_axis(spec: str, base, flag: str = '--sweep') -> tuple[str, list]:
  """'model.num_experts=4,8,16' -> ('model.num_experts', [4, 8, 16]); each value takes the
  type of the key's current value in `base`. `flag` names the option in error messages."""
  if '=' not in spec:
    raise config_lib.ConfigError(f'{flag}={spec!r} has no values; write '
                                 f'{flag}=KEY=V1,V2 (e.g. model.num_experts=4,8).')
  key, values = spec.split('=', 1)
  config_lib.check_key(key)
  current = config_lib.get_key(base, key)
  return key, [_parse(key, v.strip(), current, flag) for v in values.split(',') if v.strip()]


def _parse(key: str, text: str, current, flag: str):
  if isinstance(current, bool):
    if text.lower() not in ('true', 'false'):
      raise config_lib.ConfigError(f'{flag} value {text!r} for {key} is not a bool; use '
                                   'true or false.')
    return text.lower() == 'true'
  try:
    return type(current)(text) if isinstance(current, (int, float)) else text
  except ValueError:
    raise config_lib.ConfigError(f'{flag} value {text!r} for {key} is not a '
                                 f'{type(current).__name__}; give numbers like '
                                 f'{current!r}.') from None


def run_name(overrides: dict) -> str:
  """{'model.num_experts': 8, 'model.moe.top_k': 2} -> 'num_experts=8,top_k=2'."""
  return ','.join(f'{k.rsplit(".", 1)[-1]}={v}' for k, v in overrides.items())


def grid(base, axes: list[str]) -> list[tuple[str, object]]:
  """(run name, validated config) for every combination of the sweep axes, in order.

  Every config is checked (values, mesh, vocabulary) before the first run starts, so a bad
  combination stops the sweep before anything trains."""
  from moetrain import train
  parsed = [parse_axis(a, base) for a in axes]
  if len({k for k, _ in parsed}) != len(parsed):
    raise config_lib.ConfigError('a --sweep key appears twice; give each key once with all '
                                 'its values.')
  runs = []
  for values in itertools.product(*(v for _, v in parsed)):
    overrides = dict(zip((k for k, _ in parsed), values))
    cfg = base.copy_and_resolve_references()
    with cfg.unlocked():
      for key, value in overrides.items():
        config_lib.set_key(cfg, key, value)
    try:
      train.prepare(cfg)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f'sweep run {run_name(overrides)}: {e}') from None
    runs.append((run_name(overrides), cfg))
  return runs


def sweep(base, axes: list[str], workdir, *, log=print) -> list[dict] | None:
  """Trains every grid point not yet finished, then writes the report. Returns its rows,
  or None when SIGTERM/SIGINT stopped the sweep (the run in progress saved a checkpoint;
  the same command resumes it and goes on)."""
  from moetrain import preemption, train
  from moetrain import workdir as workdir_lib
  workdir = paths.path(workdir)
  runs = grid(base, axes)
  with workdir_lib.locked(workdir, log), preemption.PreemptionHandler() as stop:
    for i, (name, cfg) in enumerate(runs):
      run_dir = workdir / name
      if paths.is_file(run_dir / SUMMARY):
        log(f'[{i + 1}/{len(runs)}] {name}: finished earlier, kept')
        continue
      if stop.stop_requested():  # the signal came between runs.
        log(stop.describe_sweep(name))
        return None
      log(f'[{i + 1}/{len(runs)}] {name}')
      summary = train.train(cfg, run_dir, log=log, stop=stop)
      if summary.preempted:
        log(stop.describe_sweep(name))
        return None
      workdir_lib.write_text(run_dir / SUMMARY,
                             json.dumps(dataclasses.asdict(summary), indent=2))
  return report(workdir, [name for name, _ in runs], log=log)


def _row(run_dir) -> dict:
  from moetrain import counting, data
  summary = json.loads(paths.read_text(run_dir / SUMMARY))
  cfg = config_lib.from_dict(json.loads(paths.read_text(run_dir / 'config.json')))
  counts = counting.count(data.resolve_vocab(cfg))
  records = metrics_lib.read_jsonl(run_dir / metrics_lib.JSONL)
  last = [r for r in records if 'loss' in r][-1]
  loads = [v for k, v in last.items() if k.endswith('load_max_over_mean')]
  dropped = [v for k, v in last.items() if k.endswith('dropped_frac')]
  return dict(run=run_dir.name, total_params=counts.total, active_params=counts.active,
              train_loss=summary['final_loss'], eval_loss=summary['eval_loss'],
              eval_bits_per_byte=summary.get('eval_bits_per_byte', float('nan')),
              tokens_per_second=summary['tokens_per_second'],
              max_over_mean_load=max(loads) if loads else float('nan'),
              dropped_frac=sum(dropped) / len(dropped) if dropped else float('nan'),
              num_experts=cfg.model.num_experts, top_k=cfg.model.moe.top_k)


def _natural(name: str) -> list:
  """Sort key that orders 'num_experts=4' before 'num_experts=16'."""
  return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', name)]


def report(workdir, names: list[str] | None = None, *, log=print) -> list[dict]:
  """Writes results.csv, results.md and the two plots for the finished runs in `workdir`
  (all of them, or `names` in that order). Returns the rows."""
  workdir = paths.path(workdir)
  rows = read_rows(workdir, names)
  if not rows:
    raise config_lib.ConfigError(f'{workdir} holds no finished runs (no */{SUMMARY}); run '
                                 '`moetrain sweep` first.')
  table = io.StringIO(newline='')
  writer = csv.DictWriter(table, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  paths.write_text(workdir / 'results.csv', table.getvalue())
  paths.write_text(workdir / 'results.md', '\n'.join(markdown_table(rows)) + '\n')
  _plot(workdir, [r['run'] for r in rows])
  for line in markdown_table(rows):
    log(line)
  return rows


def read_rows(workdir, names: list[str] | None = None) -> list[dict]:
  """One row per finished run in `workdir` (all of them in natural order, or `names`):
  its parameter counts, losses, throughput, load balance and drops, and the run's
  num_experts and top_k."""
  workdir = paths.path(workdir)
  if names is None:
    names = sorted((p.parent.name for p in paths.glob(workdir, f'*/{SUMMARY}')), key=_natural)
  return [_row(workdir / n) for n in names if paths.is_file(workdir / n / SUMMARY)]


def markdown_table(rows: list[dict]) -> list[str]:
  """The rows as a Markdown table, best eval loss first."""
  header = ['run', 'total params', 'active params', 'train loss', 'eval loss', 'bits/byte',
            'tokens/s', 'max/mean load', 'dropped']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in sorted(rows, key=lambda r: r['eval_loss']):
    lines.append(f"| {r['run']} | {r['total_params']:,} | {r['active_params']:,} | "
                 f"{r['train_loss']:.4f} | {r['eval_loss']:.4f} | "
                 f"{r['eval_bits_per_byte']:.4f} | {r['tokens_per_second']:,.0f} | "
                 f"{r['max_over_mean_load']:.2f} | "
                 f"{r['dropped_frac']:.3f} |")
  return lines


def _curves(path, key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one scalar in a metrics.jsonl; the last record of a step wins
  (a resumed run logs some steps again)."""
  by_step = {r['step']: r[key] for r in metrics_lib.read_jsonl(path) if key in r}
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def _save(fig, path):
  """Writes a matplotlib figure as PNG to `path` (a local file or an object)."""
  png = io.BytesIO()
  fig.savefig(png, format='png', dpi=120)
  paths.write_bytes(path, png.getvalue())


def _plot(workdir, names: list[str]):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
  finals = []
  for name in names:
    path = workdir / name / metrics_lib.JSONL
    train_ax.plot(*_curves(path, 'loss'), label=name, alpha=0.8)
    steps, evals = _curves(path, 'eval/loss')
    eval_ax.plot(steps, evals, marker='o', label=name)
    finals.append(evals[-1])
  train_ax.set(xlabel='step', ylabel='train loss (nats/token)', title='train loss')
  eval_ax.set(xlabel='step', ylabel='eval loss (nats/token)', title='eval loss')
  for ax in (train_ax, eval_ax):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  _save(fig, workdir / 'loss_curves.png')
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(7, 0.8 + 0.4 * len(names)))
  ax.barh(names, finals)
  ax.set(xlabel='final eval loss (nats/token)', xlim=(min(finals) * 0.98, max(finals) * 1.01))
  fig.tight_layout()
  _save(fig, workdir / 'final_eval_loss.png')
  plt.close(fig)
