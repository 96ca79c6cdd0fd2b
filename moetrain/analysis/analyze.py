"""What did the experts learn: `moetrain analyze --workdir=RUN [--eval_batches=N]
[--config.data.KEY=V ...]` restores a run (on this process's devices, any mesh) and, on its
eval split or other data given by overrides, measures

  specialization  per MoE layer, an experts x categories matrix of routed assignments
                  (Python `tokenize` categories for Python source, character classes for
                  any text), its NMI beside a random router of the same load, and each
                  expert's most frequent tokens;
  ablation        eval loss with expert e of layer l removed (`model.moe.remove_experts`),
                  with every token's top-1 choice removed, with only the top-1 kept
                  (`model.moe.remove_choices`);
  capacity        eval loss and dropped fraction at eval capacity factors 0.5 .. 4 and
                  dropless;
  cross-layer     how often a token's top-1 expert in layer l predicts its top-1 in l+1,
                  beside the chance level;

and writes RUN/analysis/: analysis.json, summary.md and PNG figures (`report.py`). The
routing decisions come from the model's eval-time statistics (`expert_TK`, each token's
routed experts before capacity); every loss comes from `moetrain.evaluate.evaluate`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moetrain import config as config_lib
from moetrain import data as data_lib
from moetrain import evaluate as evaluate_lib
from moetrain import restore as restore_lib
from moetrain import state as state_lib
from moetrain import token_bytes
from moetrain.analysis import categories as categories_lib
from moetrain.analysis import measures
from moetrain.parallel import mesh as mesh_lib

CAPACITY_FACTORS = (0.5, 1.0, 1.25, 2.0, 4.0)
TOP_TOKENS = 8


def routes(model, batches: list[dict], mesh) -> np.ndarray:
  """int32 [MoE layers, N, K]: each input token's routed experts (best first, before
  capacity) in every MoE layer, for the N = sum of B * L input tokens of `batches` in
  order (row-major within a batch), run on `mesh`."""
  graphdef, params, model_state = state_lib.split_model(model)

  def choices(params, model_state, batch):
    m = nnx.merge(graphdef, params, model_state)
    _, stats = m(batch['inputs'], positions_BL=batch.get('positions'),
                 segment_ids_BL=batch.get('segment_ids'), train=False)
    return jnp.stack([s['expert_TK'] for s in stats])

  choices = jax.jit(choices)
  sharding = mesh_lib.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    out = [np.asarray(jax.device_get(choices(params, model_state,
                                             data_lib.to_global(b, sharding))))
           for b in batches]
  return np.concatenate(out, axis=1)


def token_stream(batches: list[dict]) -> tuple[np.ndarray, np.ndarray]:
  """The packed rows behind `batches` as one stream (each row's inputs, then its last
  target), and the stream index of every input token in `routes` order:
  (ids [S] int, index [N] int)."""
  rows = [np.concatenate([b['inputs'], b['targets'][:, -1:]], axis=1) for b in batches]
  rows = np.concatenate(rows)
  num_rows, width = rows.shape
  index = (np.arange(num_rows)[:, None] * width + np.arange(width - 1)[None]).reshape(-1)
  return rows.reshape(-1), index


def is_python(data_cfg) -> bool:
  """Whether the data is Python source: the standard library, or files that are all .py."""
  if data_cfg.source == 'stdlib':
    return True
  paths = [p.strip() for p in data_cfg.paths.split(',') if p.strip()]
  return data_cfg.source == 'files' and bool(paths) and all(p.endswith('.py') for p in paths)


def token_categories(run, batches) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
  """{scheme: (category names, int [N] category of each input token, -1 for none)}:
  'char class' always, 'python' for Python source (`is_python`)."""
  stream_S, index_N = token_stream(batches)
  tok, vocab = run.tokenizer, run.cfg.model.vocab_size
  classes_V = categories_lib.char_class_table(tok.decode, vocab, tok.eod_id)
  out = {'char class': (categories_lib.CHAR_CLASSES, classes_V[stream_S[index_N]])}
  if is_python(run.cfg.data):
    bytes_V = token_bytes.token_bytes(tok, vocab).mid_V
    python_S = categories_lib.python_token_categories(stream_S, tok.decode, bytes_V,
                                                      tok.eod_id)
    out = {'python': (categories_lib.PYTHON, python_S[index_N]), **out}
  return out


def specialization(expert_LNK, schemes, ids_N, layers, num_experts, decode) -> list[dict]:
  """Per MoE layer: for each scheme the experts x categories counts, NMI and the random
  router's NMI; and each expert's most frequent tokens."""
  out = []
  for layer, expert_NK in zip(layers, expert_LNK):
    entry = dict(layer=layer, schemes={})
    for scheme, (names, category_N) in schemes.items():
      counts = measures.contingency(expert_NK, category_N, num_experts, len(names))
      entry['schemes'][scheme] = dict(
          categories=list(names), counts=counts.tolist(), nmi=measures.nmi(counts),
          random_nmi=measures.random_router_nmi(expert_NK, category_N, num_experts,
                                                len(names)))
    entry['top_tokens'] = [[dict(token=decode_token(decode, i), id=i, count=n)
                            for i, n in expert]
                           for expert in measures.top_tokens(expert_NK, ids_N, num_experts,
                                                             TOP_TOKENS)]
    out.append(entry)
  return out


def decode_token(decode, token_id: int) -> str:
  """A token's text for tables: its decoding, or <id N> when that is empty or a partial
  UTF-8 character."""
  text = decode([token_id])
  return text if text and '\ufffd' not in text else f'<id {token_id}>'


def cross_layer(expert_LNK, layers, num_experts) -> list[dict]:
  """`measures.cross_layer` of each pair of consecutive MoE layers' top-1 choices."""
  return [dict(layer=a, next_layer=b, **measures.cross_layer(expert_LNK[i, :, 0],
                                                             expert_LNK[i + 1, :, 0],
                                                             num_experts))
          for i, (a, b) in enumerate(zip(layers, layers[1:]))]


def _scores(totals) -> dict:
  return dict(loss=totals.loss, dropped=list(totals.dropped))


def without_expert(model, layer: int, expert: int):
  """`model` with every weight of `expert` in MoE layer `layer` set to 0, in place (pass a
  model of its own: `Run.model()`). The expert's assignments keep their slots and add 0:
  exactly `model.moe.remove_experts='layer:expert'`, but the model keeps its structure, so
  every ablation shares the run's compiled eval step; scanned stacks [layers, E, ...] too."""
  for module, module_layers in model.moe_modules():
    if layer in module_layers:
      for w in (module.w_gate, module.w_up, module.w_down):
        index = (module_layers.index(layer), expert) if w[...].ndim == 4 else (expert,)
        w[...] = w[...].at[index].set(0)
      return model
  raise ValueError(f'layer {layer} is not a MoE layer of this model')


def ablation(run, batches, base, layers, log) -> dict:
  """Eval loss with each expert of each MoE layer removed (`without_expert`), and with
  the top-1 choice removed / only kept (token choice)."""
  m = run.cfg.model
  experts = []
  for layer in layers:
    row = []
    for e in range(m.num_experts):
      model = without_expert(run.model(), layer, e)
      row.append(evaluate_lib.evaluate(run, batches, model=model).loss)
    log(f'ablation: layer {layer}: ' + ' '.join(f'{x - base.loss:+.4f}' for x in row))
    experts.append(row)
  out = dict(base_loss=base.loss, expert_loss=experts, choices={})
  if m.moe.router == 'token_choice':
    variants = {'without top-1': '1'}
    if m.moe.top_k > 1:
      variants['top-1 only'] = ','.join(str(r) for r in range(2, m.moe.top_k + 1))
    for name, ranks in variants.items():
      model = run.model({'model.moe.remove_choices': ranks})
      out['choices'][name] = evaluate_lib.evaluate(run, batches, model=model).loss
  return out


def capacity(run, batches, log) -> list[dict]:
  """Eval loss and dropped fraction per MoE layer at each eval capacity factor, and
  dropless (token choice)."""
  m = run.cfg.model
  variants = [(f'{cf:g}', {'model.moe.eval_capacity_factor': cf}) for cf in CAPACITY_FACTORS]
  if m.moe.router == 'token_choice':
    variants.append(('dropless', {'model.moe.dropless': True}))
  out = []
  for name, overrides in variants:
    totals = evaluate_lib.evaluate(run, batches, model=run.model(overrides))
    out.append(dict(capacity_factor=name, **_scores(totals)))
    log(f'capacity {name}: eval loss {totals.loss:.4f}, dropped '
        f'{np.mean(totals.dropped):.4f}')
  return out


def analyze(workdir, overrides: dict | None = None, num_batches: int | None = None, *,
            log=print) -> dict:
  """Runs every measure on `workdir`'s newest checkpoint and writes workdir/analysis/.
  Returns what analysis.json holds."""
  from moetrain.analysis import report
  run = restore_lib.load(workdir, evaluate_lib.with_eval_batches(overrides, num_batches))
  m = run.cfg.model
  layers = config_lib.moe_layers(m)
  if not layers:
    raise config_lib.ConfigError(f'{workdir} is a dense model (model.num_experts=0); '
                                 'analyze a run with experts.')
  batches = evaluate_lib.eval_batches(run.cfg)
  base = evaluate_lib.evaluate(run, batches)
  log(f'{run.workdir} at step {run.step}: {base.tokens:,.0f} eval tokens, eval loss '
      f'{base.loss:.4f}, MoE layers {layers}, {m.num_experts} experts, top-{m.moe.top_k}')
  expert_LNK = routes(run.model(), batches, run.mesh)
  stream_S, index_N = token_stream(batches)
  ids_N = stream_S[index_N]
  schemes = token_categories(run, batches)
  result = dict(
      workdir=str(run.workdir), step=run.step, tokens=int(base.tokens),
      num_experts=m.num_experts, top_k=m.moe.top_k, router=m.moe.router, layers=layers,
      eval_loss=base.loss, eval_capacity_factor=m.moe.eval_capacity_factor,
      data=dict(source=run.cfg.data.source, paths=run.cfg.data.paths),
      load=[np.bincount(e.reshape(-1), minlength=m.num_experts).tolist() for e in expert_LNK],
      specialization=specialization(expert_LNK, schemes, ids_N, layers, m.num_experts,
                                    run.tokenizer.decode),
      cross_layer=cross_layer(expert_LNK, layers, m.num_experts))
  result['ablation'] = ablation(run, batches, base, layers, log)
  result['capacity'] = capacity(run, batches, log)
  report.write(run.workdir / 'analysis', result)
  return result
