"""The files `moetrain analyze` writes into RUN/analysis/ from its result dict:
analysis.json (everything), summary.md (the tables), and PNG figures:
specialization_layer{L}.png (experts x categories, per scheme), ablation.png (loss change
per removed expert) and capacity.png (eval loss and dropped fraction vs capacity factor).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile

import numpy as np

from moetrain import paths


def _cell(text: str) -> str:
  """A token's text inside a Markdown table cell: escapes shown, spaces as ␣."""
  return repr(text)[1:-1].replace(' ', '␣').replace('|', '\\|').replace('`', "'")


def summary_lines(r: dict) -> list[str]:
  """summary.md: one table per measure."""
  e = r['num_experts']
  lines = [f"# What the experts learned: {r['workdir']} (step {r['step']})", '',
           f"{r['tokens']:,} eval tokens of data.source={r['data']['source']}, eval loss "
           f"{r['eval_loss']:.4f} at eval capacity factor {r['eval_capacity_factor']:g}; "
           f"{e} experts, top-{r['top_k']}, {r['router']} routing.", '',
           '## Specialization', '',
           'NMI between the routed expert and the token category (0: unrelated, 1: each '
           'determines the other), beside a random router of the same load:', '']
  schemes = list(r['specialization'][0]['schemes'])
  lines += ['| layer | ' + ' | '.join(f'NMI {s} | random {s}' for s in schemes) + ' |',
            '|---|' + '---|---|' * len(schemes)]
  for s in r['specialization']:
    lines.append(f"| {s['layer']} | " + ' | '.join(
        f"{s['schemes'][k]['nmi']:.3f} | {s['schemes'][k]['random_nmi']:.3f}"
        for k in schemes) + ' |')
  first = r['specialization'][0]
  lines += ['', f"Most frequent tokens per expert, layer {first['layer']} (assignments):", '',
            '| expert | tokens |', '|---|---|']
  for i, tokens in enumerate(first['top_tokens']):
    lines.append(f'| {i} | ' + ' '.join(f"`{_cell(t['token'])}` {t['count']}"
                                        for t in tokens) + ' |')
  a = r['ablation']
  lines += ['', '## Expert ablation', '',
            f"Eval loss change when expert e of one layer is removed (base {a['base_loss']:.4f}; "
            'its assignments get weight 0, the residual carries them):', '',
            '| layer | ' + ' | '.join(str(i) for i in range(e)) + ' |', '|---|' + '---|' * e]
  for layer, row in zip(r['layers'], a['expert_loss']):
    lines.append(f'| {layer} | ' + ' | '.join(f"{x - a['base_loss']:+.4f}" for x in row)
                 + ' |')
  for name, loss in a['choices'].items():
    lines.append(f"\n{name}: eval loss {loss:.4f} ({loss - a['base_loss']:+.4f})")
  lines += ['', '## Capacity at eval', '', '| capacity factor | eval loss | dropped |',
            '|---|---|---|']
  for c in r['capacity']:
    lines.append(f"| {c['capacity_factor']} | {c['loss']:.4f} | {np.mean(c['dropped']):.4f} |")
  if r['cross_layer']:
    lines += ['', '## Cross-layer routing', '',
              "How often a token's top-1 expert in layer l predicts its top-1 in the next "
              'MoE layer (the best mapping), beside chance (the most frequent next expert):',
              '', '| layers | accuracy | chance | NMI |', '|---|---|---|---|']
    for c in r['cross_layer']:
      lines.append(f"| {c['layer']} -> {c['next_layer']} | {c['accuracy']:.3f} | "
                   f"{c['chance']:.3f} | {c['nmi']:.3f} |")
  return lines


def repository_path(path):
  """`path` as given when absolute or in a bucket (gs://, `moetrain.paths`), else under the
  repository root: the first directory from the current one upward that holds
  pyproject.toml (notebooks run in notebooks/), or the current directory."""
  if paths.is_cloud(path):
    return paths.path(path)
  path, here = pathlib.Path(path), pathlib.Path.cwd().resolve()
  if path.is_absolute():
    return path
  root = next((d for d in (here, *here.parents) if (d / 'pyproject.toml').is_file()), here)
  return root / path


def plot_specialization(entry: dict):
  """Per scheme, the share of each category's assignments that went to each expert."""
  import matplotlib.pyplot as plt
  schemes = entry['schemes']
  widths = [len(s['categories']) for s in schemes.values()]
  fig, axes = plt.subplots(1, len(schemes), figsize=(2 + 0.75 * sum(widths), 4.2),
                           gridspec_kw=dict(width_ratios=widths), squeeze=False)
  for ax, (name, s) in zip(axes[0], schemes.items()):
    counts = np.array(s['counts'], float)
    share = counts / np.maximum(counts.sum(0, keepdims=True), 1)
    ax.imshow(share, aspect='auto', cmap='viridis', vmin=0, vmax=max(share.max(), 1e-9))
    ax.set_xticks(range(len(s['categories'])), s['categories'], rotation=45, ha='right')
    ax.set_yticks(range(counts.shape[0]))
    ax.set(ylabel='expert', title=f"{name}: NMI {s['nmi']:.3f} (random {s['random_nmi']:.3f})")
    for (i, j), v in np.ndenumerate(share):
      ax.text(j, i, f'{100 * v:.0f}', ha='center', va='center', fontsize=7,
              color='white' if v < 0.6 * share.max() else 'black')
  fig.suptitle(f"layer {entry['layer']}: share of each category's assignments per expert (%)",
               fontsize=10)
  fig.tight_layout()
  return fig


def plot_ablation(r: dict):
  """Eval loss change per removed expert (layers x experts)."""
  import matplotlib.pyplot as plt
  a = r['ablation']
  delta = np.array(a['expert_loss']) - a['base_loss']
  fig, ax = plt.subplots(figsize=(1.5 + 0.6 * r['num_experts'], 1 + 0.5 * len(r['layers'])))
  limit = max(np.abs(delta).max(), 1e-9)
  ax.imshow(delta, cmap='RdBu_r', vmin=-limit, vmax=limit, aspect='auto')
  ax.set_xticks(range(r['num_experts']))
  ax.set_yticks(range(len(r['layers'])), r['layers'])
  ax.set(xlabel='expert removed', ylabel='layer', title='eval loss change (nats/token)')
  for (i, j), v in np.ndenumerate(delta):
    ax.text(j, i, f'{v:+.3f}', ha='center', va='center', fontsize=7)
  fig.tight_layout()
  return fig


def plot_capacity(r: dict):
  """Eval loss (and dropless) and the dropped fraction against the eval capacity factor."""
  import matplotlib.pyplot as plt
  finite = [c for c in r['capacity'] if c['capacity_factor'] != 'dropless']
  factors = [float(c['capacity_factor']) for c in finite]
  fig, ax = plt.subplots(figsize=(5.5, 3.5))
  ax.plot(factors, [c['loss'] for c in finite], 'o-', label='eval loss')
  for c in r['capacity']:
    if c['capacity_factor'] == 'dropless':
      ax.axhline(c['loss'], ls='--', color='gray', label='dropless')
  ax.set(xscale='log', xlabel='eval capacity factor', ylabel='eval loss (nats/token)')
  ax.set_xticks(factors, [f'{f:g}' for f in factors])
  ax.minorticks_off()
  drop_ax = ax.twinx()
  drop_ax.plot(factors, [np.mean(c['dropped']) for c in finite], 's:', color='C3',
               label='dropped')
  drop_ax.set_ylabel('dropped fraction', color='C3')
  ax.legend(loc='upper center')
  fig.tight_layout()
  return fig


def _save(fig, path: pathlib.Path):
  import matplotlib.pyplot as plt
  fig.savefig(path, dpi=80)
  plt.close(fig)


def write(directory, result: dict) -> list[str]:
  """Writes analysis.json, summary.md and the figures into `directory` (local or gs://),
  replacing a previous analysis in a local folder only once the new one is complete.
  Returns summary.md's lines."""
  import matplotlib
  matplotlib.use('Agg')
  lines = summary_lines(result)
  cloud = paths.is_cloud(directory)
  parent = None if cloud else pathlib.Path(directory).parent
  if parent is not None:
    parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix='.analysis-', dir=parent))
  (tmp / 'analysis.json').write_text(json.dumps(result, indent=1))
  (tmp / 'summary.md').write_text('\n'.join(lines) + '\n')
  for entry in result['specialization']:
    _save(plot_specialization(entry), tmp / f"specialization_layer{entry['layer']}.png")
  _save(plot_ablation(result), tmp / 'ablation.png')
  _save(plot_capacity(result), tmp / 'capacity.png')
  if cloud:
    for f in sorted(tmp.iterdir()):
      paths.upload(f, paths.path(directory) / f.name)
    shutil.rmtree(tmp)
  else:
    directory = pathlib.Path(directory)
    if directory.exists():
      shutil.rmtree(directory)
    tmp.rename(directory)
  return lines
