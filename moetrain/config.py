"""Configuration: the default `ConfigDict`, loading config files, and validation.

Every experiment is a Python file in `configs/` whose `get_config()` starts from
`default_config()` and changes what it needs. `validate` checks a finished config and
raises `ConfigError` with one sentence naming the key and the fix, before anything is
compiled.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import pathlib
import traceback

import ml_collections

# The keys that take one of a fixed set of values, and those values (what each means: the
# comment at the key in `default_config`); `validate` accepts no other, and its errors and
# `moetrain COMMAND --help` list them.
CHOICES = {
    'model.dtype': ('float32', 'bfloat16'),
    'model.param_dtype': ('float32', 'bfloat16'),
    'model.remat': ('none', 'full', 'save_dots', 'minimal'),
    'model.attention_impl': ('auto', 'xla', 'dot_product', 'cudnn', 'splash'),
    'model.moe.router': ('token_choice', 'expert_choice', 'soft'),
    'model.moe.gate': ('softmax', 'sigmoid'),
    'model.moe.softmax_order': ('softmax_topk', 'topk_softmax'),
    'model.moe.drop_order': ('position', 'probability'),
    'model.moe.dropless_impl': ('auto', 'padded', 'ragged'),
    'model.moe.grouped_matmul': ('xla', 'tokamax'),
    'model.moe.balance_scope': ('micro_batch', 'global', 'sequence'),
    'data.source': ('stdlib', 'files', 'hub', 'prepared'),
    'data.format': ('auto', 'text', 'json', 'parquet'),
    'data.sample_by': ('line', 'paragraph', 'document'),
    'data.bpe_encoder': ('tokenizers', 'tiktoken'),
}


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key and the fix."""


def default_config() -> ml_collections.ConfigDict:
  """Every key the framework reads, with its default value."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  m = c.model
  m.vocab_size = 0  # 0: the tokenizer's vocabulary rounded up to a multiple of 128.
  m.d_model = 128
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 2  # grouped-query attention; == num_heads is multi-head attention.
  m.head_dim = 0  # features per attention head; 0: d_model // num_heads.
  m.d_ff = 512  # hidden size of the dense SwiGLU feed-forward.
  m.num_experts = 8  # 0: every feed-forward is dense (the dense baseline).
  m.moe_every = 1  # every n-th feed-forward (after first_k_dense) is a MoE layer.
  m.first_k_dense = 0  # the first k layers keep a dense feed-forward.
  m.rope_theta = 10_000.0
  m.norm_eps = 1e-6
  m.tie_embeddings = True
  m.qk_norm = False  # RMSNorm of each query and key head before rotary embeddings (Qwen3).
  m.qkv_bias = False  # biases on the query, key and value projections (Qwen2).
  m.dtype = 'float32'  # compute dtype of matmuls; the router is always float32.
  m.param_dtype = 'float32'
  m.init_std = 0.02  # embedding init; kernels use 1/sqrt(fan_in).
  # Rematerialization of each block in the backward pass: full keeps only the block
  # inputs, save_dots every matmul output, minimal the weight matmuls' outputs (attention
  # scores and elementwise ops recomputed; MaxText's 'minimal'). Old configs' True / False
  # mean full / none (`migrated`).
  m.remat = 'none'
  # Stack the weights of each homogeneous run of blocks (first_k_dense, moe_every) along a
  # leading 'layers' axis and run it with lax.scan: one traced layer per run, so compile
  # time does not grow with depth. Same numbers as unscanned.
  m.scan_layers = False
  # xla: scores as einsums (any backend); dot_product: jax.nn.dot_product_attention;
  # cudnn: its cuDNN flash kernel (GPU, bfloat16); splash: the Pallas splash kernel (TPU);
  # auto: splash on TPU, cudnn on GPU in bfloat16, else xla.
  m.attention_impl = 'xla'
  # Cross-entropy over chunks of this many sequence positions (a scan that recomputes each
  # chunk's logits in the backward pass), so the [tokens, vocab] float32 logits are never
  # whole; 0: all at once. Must divide data.seq_len.
  m.loss_chunk = 0

  m.moe = ml_collections.ConfigDict()
  e = m.moe
  e.router = 'token_choice'
  e.gate = 'softmax'
  e.softmax_order = 'softmax_topk'  # GShard/Switch; topk_softmax: Mixtral.
  e.renormalize = False  # renormalize the k combine weights to sum to one.
  e.routed_scaling = 1.0  # multiplies the routed output (DeepSeek-V3).
  e.top_k = 2
  # training; capacity = ceil(cf * tokens * k / experts), exact: cf counts as the decimal
  # written (1.1 * 50 * 2 / 10 is 11 slots).
  e.capacity_factor = 1.25
  e.eval_capacity_factor = 2.0
  e.drop_order = 'position'  # GShard; probability: batch-prioritized (Switch, V-MoE).
  e.dropless = False
  # ragged: ragged_dot grouped matmuls and, under expert parallelism, a ragged all-to-all
  # (GPU/TPU only). auto: the ragged all-to-all where the backend has it, ragged_dot on
  # TPU only (slower than padded buffers on an H100) or with grouped_matmul='tokamax'.
  e.dropless_impl = 'auto'
  # The grouped matmuls of the ragged dropless path: xla is jax.lax.ragged_dot, tokamax
  # tokamax.ragged_dot's Pallas kernels (Mosaic GPU on H100/H200, Triton, Mosaic TPU;
  # `pip install 'moetrain[gpu]'`), which makes dropless_impl='auto' take the ragged path
  # on every backend.
  e.grouped_matmul = 'xla'
  # Dropless under expert parallelism with the ragged all-to-all: route every token, then
  # send them to their experts and back in chunks of this many tokens per device (a scan),
  # so the receive buffers, sized for the worst case (every token of every device to this
  # device's experts), shrink by tokens / chunk; same result. 0: all tokens at once.
  e.expert_chunk = 0
  e.jitter = 0.0  # multiplicative router-input noise, U(1-j, 1+j), training only.
  e.d_expert = 0  # expert hidden size; 0 means model.d_ff.
  e.num_shared_experts = 0
  # scale the shared experts' output per token by sigmoid(x @ w), w [d_model, 1] (Qwen2-MoE).
  e.shared_expert_gate = False
  e.balance_coef = 0.01
  e.balance_scope = 'micro_batch'  # the tokens one balance loss covers.
  e.z_coef = 0.001
  # > 0 turns on aux-loss-free bias balancing (DeepSeek-V3): a per-expert bias added to the
  # scores that select the top-k, never to the combine weights. The scores are the sigmoid
  # scores (gate='sigmoid') or the softmax probabilities over all experts (gate='softmax',
  # both softmax orders: topk_softmax selects by probability + bias, then weights the
  # chosen experts by a softmax of their logits).
  e.bias_update_rate = 0.0
  # Ablation (what `moetrain analyze` measures): comma-separated experts whose assignments
  # are removed, 'E' (expert E in every MoE layer) or 'L:E' (expert E of layer L only).
  # A removed assignment keeps its slot and gets combine weight 0 (the token's other
  # weights are not renormalized), so the residual carries it. '': none.
  e.remove_experts = ''
  # comma-separated choice ranks removed the same way (1: each token's top-1 choice;
  # '2' with top_k=2 keeps only the top-1). Token choice only. '': none.
  e.remove_choices = ''

  c.data = ml_collections.ConfigDict()
  d = c.data
  # stdlib: the Python standard library's source; files; hub: both tokenized once into
  # data.cache_dir, then read like prepared tokens; prepared: the token files written by
  # `moetrain data prepare` (data.paths=DIR, or several in data.mixture).
  d.source = 'stdlib'
  d.paths = ''  # source=files: comma-separated globs of local files; source=prepared: DIR.
  # source=prepared: weighted prepared directories instead of data.paths,
  # '[NAME=]DIR:WEIGHT,...' (e.g. 'code=tok/code:0.3,prose=tok/prose:0.7'; weights are
  # normalized; NAME defaults to the directory's name and labels the logged tokens seen).
  d.mixture = ''
  d.cache_dir = ''  # tokens of stdlib/files/hub sources; '' = $MOETRAIN_CACHE or ~/.cache/moetrain
  d.shard_mb = 32.0  # prepare: MB of text per token shard (the unit of parallel work and resume).
  d.prepare_workers = 0  # prepare: tokenizer processes; 0 = one per CPU core.
  d.format = 'auto'  # source=files: the files' format (auto: from the suffix).
  d.text_field = 'text'  # the column holding the text (files in json/parquet, hub).
  d.sample_by = 'line'  # format=text: one document per line, paragraph or document (file).
  d.hub_name = ''  # source=hub: dataset name on the HF hub (streamed; needs a network).
  d.hub_config = ''  # source=hub: the dataset's config name, '' for its default.
  d.hub_split = 'train'  # source=hub: the split to read.
  d.tokenizer = 'byte'  # byte | path to a HF tokenizers .json | a sentencepiece .model
  # prepare: what encodes a HF byte-level BPE .json; tiktoken gives the same ids with 3.5x
  # less CPU (checked against tokenizers on each batch's first documents).
  d.bpe_encoder = 'tokenizers'
  d.document_mask = False  # attention and positions restart at each document.
  d.prefetch = 2  # batches built ahead in a background thread; 0: none.
  d.seq_len = 128
  d.batch_size = 16  # global batch, in sequences.
  d.eval_fraction = 0.05  # share of documents held out for eval.
  d.max_documents = 0  # 0: all documents of the source.

  c.train = ml_collections.ConfigDict()
  t = c.train
  t.steps = 300
  t.lr = 3e-3
  t.warmup_steps = 30
  t.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio.
  t.weight_decay = 0.1
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.clip_norm = 1.0
  t.log_every = 10
  t.eval_every = 100
  t.eval_batches = 8
  t.progress = True
  # The divergence guard (moetrain/guard.py) stops training at a bad step, before it is
  # saved, naming the last good checkpoint. Bad: a NaN/Inf loss, gradient norm or new
  # parameters, or a spike against the median of the last spike_window good steps: a loss
  # above spike_loss_factor * max(median, 1 nat), a gradient norm above spike_grad_factor *
  # its median. spike_window=0 turns spike detection off.
  t.spike_window = 50
  t.spike_loss_factor = 3.0
  t.spike_grad_factor = 20.0
  # True: skip updates with a NaN/Inf loss, gradient norm or new parameters (and log
  # spikes) instead of stopping, until max_bad_in_a_row bad steps in a row stop the run.
  t.skip_nonfinite = False
  t.max_bad_in_a_row = 3
  # Split each batch into this many micro-batches, run them in a lax.scan and apply their
  # summed gradient once (each micro-batch's cross-entropy divides by the whole batch's
  # token count: the same update as the whole batch; capacity and the balance statistics
  # are per micro-batch, see the README).
  t.grad_accum_steps = 1

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 0  # async saves; 0: only the final one (and on SIGTERM/SIGINT).
  # newest checkpoints kept (plus the last good one, see train.spike_window); older ones go
  # once the newest reads back.
  c.checkpoint.keep = 3
  # > 0: resume from this step instead of the newest (e.g. the last good one a divergence
  # named); newer checkpoints move to checkpoints.abandoned/. Once the run has saved past
  # it, the same command resumes from the newest again.
  c.checkpoint.restore_step = 0

  c.init = ml_collections.ConfigDict()
  # a workdir whose newest checkpoint's parameters start this run (a fresh optimizer, step
  # 0; used only when this run's workdir has no checkpoint yet). '': a random init.
  c.init.from_workdir = ''
  # with from_workdir: sparse upcycling (Komatsuzaki et al. 2022): every expert of a MoE
  # layer copies the source's dense feed-forward of that layer, routers start fresh.
  c.init.upcycle = False

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by the other axes.
  c.mesh.fsdp = 1  # weights and optimizer state split over this axis (ZeRO-3 / FSDP).
  c.mesh.expert = 1
  return c


def load(path: str | pathlib.Path, *args) -> ml_collections.ConfigDict:
  """Loads `get_config(*args)` from a config file (without validating it; old spellings
  of values updated, `migrate`).

  Every way a config file can fail (missing, a syntax error, an exception while it runs,
  no get_config, a result that is not a ConfigDict) raises ConfigError with one sentence
  naming the file and, where there is one, the line.
  """
  path = pathlib.Path(path)
  name = str(path)
  if not path.is_file():
    raise ConfigError(f'config file {name!r} does not exist; pass --config=PATH to a '
                      'file in configs/.')
  spec = importlib.util.spec_from_file_location(f'moetrain_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f'config file {name!r} line {e.lineno}: {e.msg}; fix the syntax '
                      'there.') from None
  except Exception as e:  # noqa: BLE001 -- whatever the file raises becomes one sentence.
    raise _raised_in(path, 'running it', e) from None
  if not callable(getattr(module, 'get_config', None)):
    raise ConfigError(f'config file {name!r} has no get_config(); define one that '
                      'returns a ConfigDict.')
  try:
    cfg = module.get_config(*args)
  except Exception as e:  # noqa: BLE001
    raise _raised_in(path, 'get_config()', e) from None
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f'config file {name!r}: get_config() returned an object of type '
                      f'{type(cfg).__name__}, not a ConfigDict; return one, e.g. start '
                      'from moetrain.config.default_config().')
  return migrate(cfg)


def _raised_in(path: pathlib.Path, what: str, error: Exception) -> ConfigError:
  """ConfigError for an exception raised by a config file, at its deepest line there."""
  lines = [lineno for f, lineno in traceback.walk_tb(error.__traceback__)
           if pathlib.Path(f.f_code.co_filename).resolve() == path.resolve()]
  where = f' line {lines[-1]}' if lines else ''
  text = str(error).strip().splitlines()[0] if str(error).strip() else ''
  cause = f'{type(error).__name__}: {text}' if text else type(error).__name__
  return ConfigError(f'config file {str(path)!r}{where} raised {cause} in {what}; fix the '
                     'file.')


def _flatten(cfg, prefix=''):
  out = {}
  for key, value in cfg.items():
    name = f'{prefix}{key}'
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flatten(value, name + '.'))
    else:
      out[name] = value
  return out


def from_dict(values: dict) -> ml_collections.ConfigDict:
  """The default config updated with a nested dict, such as a run's saved config.json
  (old spellings of values updated, `migrated`)."""
  cfg = default_config()
  for key, value in _flatten(ml_collections.ConfigDict(values)).items():
    check_key(key)
    set_key(cfg, key, migrated(key, value))
  return cfg


def migrated(key: str, value):
  """What today's code reads for a value of `key` as older configs wrote it:
  model.remat True / False (saved before remat had policies, or 'True' / 'False' on a
  command line) is 'full' / 'none'. Any other value is returned as it is."""
  if key == 'model.remat' and str(value).lower() in ('true', 'false'):
    return 'full' if str(value).lower() == 'true' else 'none'
  return value


def migrate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Rewrites the old spellings in `cfg` (`migrated`) in place and returns it: once, where
  a config comes in (`load`, `from_dict`, the command line)."""
  for key, value in _flatten(cfg).items():
    new = migrated(key, value)
    if new is not value:
      set_key(cfg, key, new)
  return cfg


def get_key(cfg, key: str):
  """The value of a dotted key: get_key(cfg, 'model.moe.top_k')."""
  node = cfg
  for part in key.split('.'):
    node = node[part]
  return node


def set_key(cfg, key: str, value):
  """Sets a dotted key in place: set_key(cfg, 'model.moe.top_k', 2)."""
  parent, _, leaf = key.rpartition('.')
  (get_key(cfg, parent) if parent else cfg)[leaf] = value


def check_key(key: str):
  """Raises ConfigError for a dotted key that no config has."""
  known = _flatten(default_config())
  if key not in known:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean '{close[0]}'?" if close else 'remove it.'
    raise ConfigError(f"unknown config key '{key}'; {hint}")


def _check_keys(cfg):
  for key in _flatten(cfg):
    check_key(key)


def moe_layers(model) -> list[int]:
  """Indices of the layers whose feed-forward is a MoE layer."""
  if model.num_experts == 0:
    return []
  return [i for i in range(model.first_k_dense, model.num_layers)
          if (i - model.first_k_dense + 1) % model.moe_every == 0]


def clamp_warmup(cfg) -> str | None:
  """Few-step runs (smoke tests): a train.warmup_steps above train.steps becomes
  train.steps, in place. Returns the one line that says so, or None."""
  t = cfg.train
  if t.warmup_steps <= t.steps:
    return None
  note = (f'train.warmup_steps={t.warmup_steps} exceeds train.steps={t.steps}, so the '
          f'warmup is clamped to {t.steps} steps.')
  t.warmup_steps = t.steps
  return note


def parse_ints(text: str) -> list[int]:
  """'1, 3' -> [1, 3]; '' -> []. Raises ValueError for anything else."""
  return [int(part) for part in text.split(',') if part.strip()]


def removed_experts(text: str) -> list[tuple[int | None, int]]:
  """model.moe.remove_experts -> [(layer or None for every MoE layer, expert)]:
  '3, 1:5' -> [(None, 3), (1, 5)]. Raises ValueError for anything else."""
  out = []
  for part in (p.strip() for p in text.split(',') if p.strip()):
    layer, _, expert = part.rpartition(':')
    out.append((int(layer) if layer else None, int(expert)))
  return out


def parse_mixture(spec: str) -> list[tuple[str, str, float]]:
  """data.mixture '[NAME=]DIR:WEIGHT,...' -> [(name, dir, weight)], weights summing to 1.
  NAME defaults to the directory's last path component; names must differ."""
  entries = []
  for part in (p.strip() for p in spec.split(',')):
    if not part:
      continue
    head, _, weight = part.rpartition(':')
    try:
      value = float(weight)
    except ValueError:
      value = math.nan
    if not head or not (math.isfinite(value) and value > 0):
      raise ConfigError(f'data.mixture entry {part!r} is not DIR:WEIGHT with a positive '
                        'weight; write e.g. data.mixture=tok/code:0.3,tok/prose:0.7.')
    name, eq, path = head.partition('=')
    if not eq:
      name, path = pathlib.PurePath(head).name or head, head
    if any(name == other for other, _, _ in entries):
      raise ConfigError(f'data.mixture names {name!r} twice; give each directory its own '
                        'name, e.g. data.mixture=code=DIR_A:0.3,prose=DIR_B:0.7.')
    entries.append((name, path, value))
  if not entries:
    raise ConfigError('data.mixture has no DIR:WEIGHT entry; write e.g. '
                      'data.mixture=tok/code:0.3,tok/prose:0.7.')
  total = sum(w for _, _, w in entries)
  return [(name, path, w / total) for name, path, w in entries]


def _require(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)




def _positive(name: str, value, allow_zero: bool = False):
  """`name`=value is a number > 0 (>= 0 with allow_zero)."""
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
      value >= 0 if allow_zero else value > 0)
  what = 'non-negative' if allow_zero else 'positive'
  _require(ok, f'{name}={value!r} must be {what}; set it to a {what} number.')


def _bool(name: str, value, fix: str = '; set it to a bool.'):
  _require(isinstance(value, bool), f'{name}={value!r} must be True or False{fix}')


def _one_of(key: str, value, verb: str = 'is not known'):
  """`key`=value is one of CHOICES[key]."""
  allowed = CHOICES[key]
  _require(value in allowed, f'{key}={value!r} {verb}; use one of {", ".join(allowed)}.')


def check_model(m, seq_len: int):
  """The model.* keys but model.moe (`seq_len`: data.seq_len, which model.loss_chunk
  must divide)."""
  for name in ('d_model', 'num_layers', 'num_heads', 'num_kv_heads', 'd_ff', 'moe_every'):
    _positive(f'model.{name}', m[name])
  for name in ('vocab_size', 'num_experts', 'first_k_dense'):
    _positive(f'model.{name}', m[name], allow_zero=True)
  _positive('model.head_dim', m.head_dim, allow_zero=True)
  _require(m.head_dim or m.d_model % m.num_heads == 0,
           f'model.num_heads={m.num_heads} does not divide model.d_model={m.d_model}; '
           'choose num_heads so that d_model % num_heads == 0, or set model.head_dim.')
  _require(m.head_dim % 2 == 0, f'model.head_dim={m.head_dim} is odd; rotary embeddings '
           'need an even head size, so set an even head_dim (or 0).')
  _require(m.head_dim or (m.d_model // m.num_heads) % 2 == 0,
           f'model.d_model / model.num_heads = {m.d_model // m.num_heads} is odd; rotary '
           'embeddings need an even head size, so change d_model or num_heads.')
  _require(m.num_heads % m.num_kv_heads == 0,
           f'model.num_kv_heads={m.num_kv_heads} does not divide model.num_heads='
           f'{m.num_heads}; choose num_kv_heads so that num_heads % num_kv_heads == 0.')
  _require(m.first_k_dense <= m.num_layers,
           f'model.first_k_dense={m.first_k_dense} exceeds model.num_layers={m.num_layers}; '
           'lower first_k_dense.')
  for name in ('dtype', 'param_dtype'):
    _one_of(f'model.{name}', m[name], verb='is not supported')
  _positive('model.rope_theta', m.rope_theta)
  _one_of('model.remat', m.remat)
  _bool('model.scan_layers', m.scan_layers)
  _one_of('model.attention_impl', m.attention_impl)
  _positive('model.loss_chunk', m.loss_chunk, allow_zero=True)
  _require(m.loss_chunk == 0 or seq_len % m.loss_chunk == 0,
           f'model.loss_chunk={m.loss_chunk} does not divide data.seq_len={seq_len}; '
           'choose a divisor of seq_len (or 0 for the whole sequence).')
  _positive('model.norm_eps', m.norm_eps)
  _positive('model.init_std', m.init_std)
  for name in ('qk_norm', 'qkv_bias'):
    _bool(f'model.{name}', m[name])


def check_moe(m):
  """The model.moe.* keys of a MoE model (model.num_experts > 0)."""
  e = m.moe
  _positive('model.moe.top_k', e.top_k)
  _require(e.top_k <= m.num_experts,
           f'model.moe.top_k={e.top_k} is larger than model.num_experts={m.num_experts}; '
           'set top_k <= num_experts.')
  for key in ('router', 'gate', 'softmax_order', 'drop_order', 'dropless_impl',
              'grouped_matmul', 'balance_scope'):
    _one_of(f'model.moe.{key}', e[key])
  _positive('model.moe.capacity_factor', e.capacity_factor)
  _positive('model.moe.eval_capacity_factor', e.eval_capacity_factor)
  _positive('model.moe.routed_scaling', e.routed_scaling)
  for name in ('d_expert', 'num_shared_experts', 'balance_coef', 'z_coef',
               'bias_update_rate', 'expert_chunk'):
    _positive(f'model.moe.{name}', e[name], allow_zero=True)
  _require(0 <= e.jitter < 1, f'model.moe.jitter={e.jitter} must lie in [0, 1); '
           'set it to 0 to turn jitter off.')
  _require(not (e.gate == 'sigmoid' and e.softmax_order == 'topk_softmax'),
           "model.moe.softmax_order='topk_softmax' needs gate='softmax'; set "
           "softmax_order='softmax_topk' for sigmoid gates.")
  _require(not (e.dropless and e.router != 'token_choice'),
           f"model.moe.dropless=True needs router='token_choice' (got {e.router!r}); "
           'expert choice and soft routing never drop tokens, so set dropless=False.')
  _check_grouped_matmul(e)
  _require(not (e.bias_update_rate > 0 and e.router != 'token_choice'),
           f"model.moe.bias_update_rate>0 needs router='token_choice' (got {e.router!r}); "
           'set bias_update_rate=0.')
  _require(not (e.shared_expert_gate and not e.num_shared_experts),
           'model.moe.shared_expert_gate=True needs shared experts; set '
           'model.moe.num_shared_experts >= 1 or shared_expert_gate=False.')
  _require(moe_layers(m), f'no layer is a MoE layer with model.num_layers={m.num_layers},'
           f' first_k_dense={m.first_k_dense}, moe_every={m.moe_every}; lower '
           'first_k_dense or moe_every, or set num_experts=0 for a dense model.')
  _check_removals(m)


def _check_grouped_matmul(e):
  """grouped_matmul='tokamax' runs only on the ragged dropless path, with tokamax installed."""
  if e.grouped_matmul != 'tokamax':
    return
  _require(e.dropless and e.dropless_impl != 'padded',
           "model.moe.grouped_matmul='tokamax' runs the grouped matmuls of the ragged "
           f'dropless path, which dropless={e.dropless}, dropless_impl={e.dropless_impl!r} '
           "does not take; set dropless=True with dropless_impl='auto' or 'ragged', or "
           "grouped_matmul='xla'.")
  _require(importlib.util.find_spec('tokamax') is not None,
           "model.moe.grouped_matmul='tokamax' needs the tokamax package, which is not "
           "installed; run pip install 'moetrain[gpu]' or set grouped_matmul='xla'.")


def _check_removals(m):
  """model.moe.remove_experts / remove_choices name real experts, MoE layers and ranks."""
  e = m.moe
  for name in ('remove_experts', 'remove_choices'):
    _require(isinstance(e[name], str), f'model.moe.{name}={e[name]!r} must be a string of '
             "comma-separated numbers, e.g. '3' or '0,2'.")
  try:
    removed = removed_experts(e.remove_experts)
  except ValueError:
    raise ConfigError(f'model.moe.remove_experts={e.remove_experts!r} is not a list of '
                      "experts; write ids such as '3,5' or layer:expert pairs such as "
                      "'1:3'.") from None
  layers = moe_layers(m)
  for layer, expert in removed:
    _require(0 <= expert < m.num_experts, f'model.moe.remove_experts names expert {expert}, '
             f'but the layers have experts 0..{m.num_experts - 1}; remove that entry.')
    _require(layer is None or layer in layers, f'model.moe.remove_experts names layer '
             f'{layer}, which is not a MoE layer (those are {layers}); use one of them.')
    _require(layer is None or not m.scan_layers, f'model.moe.remove_experts names layer '
             f'{layer}, but model.scan_layers runs every MoE layer of a run as one; remove '
             'that expert in every layer, or zero its weights in that layer '
             '(moetrain.analysis.analyze.without_expert, as `moetrain analyze` does).')
  try:
    ranks = parse_ints(e.remove_choices)
  except ValueError:
    raise ConfigError(f'model.moe.remove_choices={e.remove_choices!r} is not a list of '
                      "choice ranks; write ranks such as '1' or '2,3'.") from None
  for rank in ranks:
    _require(1 <= rank <= e.top_k, f'model.moe.remove_choices names rank {rank}, but '
             f'tokens choose ranks 1..{e.top_k} (top_k); remove that entry.')
  _require(not ranks or e.router == 'token_choice', 'model.moe.remove_choices needs '
           f"router='token_choice' (got {e.router!r}); only token choice ranks choices, so "
           "set remove_choices=''.")


def check_data(d):
  """The data.* keys."""
  for name in ('seq_len', 'batch_size'):
    _positive(f'data.{name}', d[name])
  _positive('data.max_documents', d.max_documents, allow_zero=True)
  _positive('data.prefetch', d.prefetch, allow_zero=True)
  _positive('data.shard_mb', d.shard_mb)
  _require(isinstance(d.prepare_workers, int) and d.prepare_workers >= 0,
           f'data.prepare_workers={d.prepare_workers!r} must be a non-negative integer; set '
           'it to 0 for one worker per CPU core.')
  for key in ('source', 'format', 'sample_by', 'bpe_encoder'):
    _one_of(f'data.{key}', d[key])
  _require(d.bpe_encoder != 'tiktoken' or d.tokenizer.endswith('.json'),
           f"data.bpe_encoder='tiktoken' encodes HF tokenizers .json files, not "
           f"data.tokenizer={d.tokenizer!r}; set data.bpe_encoder='tokenizers'.")
  _require(d.source != 'files' or d.paths.strip(), "data.source='files' needs data.paths; "
           'set it to comma-separated file globs, e.g. data.paths=corpus/*.jsonl.')
  _require(d.source == 'prepared' or not d.mixture, "data.mixture needs "
           "data.source='prepared'; set data.source='prepared' (mixtures read prepared "
           'directories).')
  _require(d.source != 'prepared' or bool(d.paths.strip()) != bool(d.mixture.strip()),
           "data.source='prepared' needs exactly one of data.paths=DIR (a directory written "
           'by `moetrain data prepare`) and data.mixture=DIR:WEIGHT,...; set one of them.')
  if d.mixture.strip():
    parse_mixture(d.mixture)
  _require(d.source != 'hub' or d.hub_name, "data.source='hub' needs data.hub_name; set it "
           'to a dataset name on the HF hub.')
  _bool('data.document_mask', d.document_mask, '.')
  _require(bool(d.tokenizer), "data.tokenizer is empty; use 'byte' or the path of a "
           'tokenizer file.')
  _require(0 < d.eval_fraction < 1, f'data.eval_fraction={d.eval_fraction} must lie in '
           '(0, 1); set a share such as 0.05.')


def check_train(t):
  """The train.* keys."""
  for name in ('steps', 'lr', 'log_every', 'eval_every', 'eval_batches', 'grad_accum_steps'):
    _positive(f'train.{name}', t[name])
  for name in ('warmup_steps', 'weight_decay', 'clip_norm', 'min_lr_ratio'):
    _positive(f'train.{name}', t[name], allow_zero=True)
  _require(0 <= t.b1 < 1 and 0 <= t.b2 < 1,
           f'train.b1={t.b1} and train.b2={t.b2} must lie in [0, 1); use e.g. 0.9 and 0.95.')
  _bool('train.skip_nonfinite', t.skip_nonfinite)
  _positive('train.spike_window', t.spike_window, allow_zero=True)
  for name in ('spike_loss_factor', 'spike_grad_factor'):
    _require(t[name] > 1, f'train.{name}={t[name]!r} must be a number above 1 (a spike is '
             'that many times the recent median); set e.g. 3, or train.spike_window=0.')
  _positive('train.max_bad_in_a_row', t.max_bad_in_a_row)


def check_init(i, num_experts: int):
  """The init.* keys (`num_experts`: model.num_experts, which upcycling needs > 0)."""
  _require(isinstance(i.from_workdir, str), f'init.from_workdir={i.from_workdir!r} must be '
           "a path; set it to a run's --workdir, or '' for a random init.")
  _require(not (i.upcycle and not i.from_workdir), 'init.upcycle=True needs '
           'init.from_workdir; set it to the dense run to upcycle, or init.upcycle=False.')
  _require(not i.upcycle or num_experts > 0, 'init.upcycle=True builds a MoE from a dense '
           'run, but model.num_experts=0; set model.num_experts > 0.')


def check_checkpoint(c):
  """The checkpoint.* keys."""
  _positive('checkpoint.every_steps', c.every_steps, allow_zero=True)
  _positive('checkpoint.keep', c.keep)
  _positive('checkpoint.restore_step', c.restore_step, allow_zero=True)


def check_mesh(mesh):
  """The mesh.* sizes (the checks against the device count: `moetrain.parallel.mesh`)."""
  for name in ('data', 'fsdp', 'expert'):
    value = mesh[name]
    _require(value == -1 or value > 0,
             f'mesh.{name}={value} must be a positive size or -1; set it to -1 to use the '
             'devices the other axes leave.')


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises `ConfigError` (one sentence: key and fix) for the first bad value, section by
  section (each check reads its section and changes nothing); returns cfg."""
  _check_keys(cfg)
  check_model(cfg.model, cfg.data.seq_len)
  if cfg.model.num_experts > 0:
    check_moe(cfg.model)
  check_data(cfg.data)
  check_train(cfg.train)
  check_init(cfg.init, cfg.model.num_experts)
  check_checkpoint(cfg.checkpoint)
  check_mesh(cfg.mesh)
  return cfg
