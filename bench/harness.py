"""Pieces of the performance harness: machine matmul rate, analytic model FLOPs, timing a
compiled train step, all-to-all bytes from compiled HLO, and the JSON / table output.

Model FLOPs (what MFU counts; the same formula as `moetrain.counting`, PaLM appendix B):

  flops_per_step = tokens * (6 * N + 12 * num_layers * seq_len * d_model)

  N = matmul parameters a token uses, summed over layers:
      attention  d_model * (num_heads + 2 * num_kv_heads) * head_dim + num_heads * head_dim * d_model
      dense FFN  3 * d_model * d_ff                     (SwiGLU: gate, up, down)
      MoE FFN    d_model * E (router) + k * 3 * d_model * d_expert (+ shared experts 3 * d_model * d_expert * S)
    + lm head    d_model * vocab (the output projection; the input embedding is a lookup and
                 norm scales are elementwise, so neither counts)
  6 = 2 (multiply-add) * 3 (forward, backward w.r.t. activations, backward w.r.t. weights).
  12 * L * S * D: the attention score (QK^T) and value (PV) products, forward and backward,
  not halved for the causal mask. Padded capacity slots and dropped tokens are not counted:
  MFU counts useful work only (k experts per token, token choice).

MFU = flops_per_step / median step seconds / measured matmul rate (the same machine, the
same run, the compute dtype's rate: float32 on CPU, bfloat16 on GPU/TPU).
mfu_peak = flops_per_step / median step seconds / the chip's datasheet dense bfloat16 rate
(`PEAK_BF16`, by jax's device_kind; none on CPU): the number issue 17 and the published
Megatron-Core / MaxText MFUs are stated against.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from moetrain import config as config_lib


# ---------------------------------------------------------------- machine matmul rate

def matmul_rate(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """FLOP/s of one jitted n x n x n matmul (2 n^3 FLOPs), median of `repeats`."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / statistics.median(times)


# Datasheet dense bfloat16 FLOP/s per chip (no sparsity), by jax `device_kind` prefix;
# the longest matching prefix wins. NVIDIA H100/H200 SXM: 989.4 TFLOP/s (H100 PCIe 756,
# H100 NVL 835); A100 312; Google Cloud TPU v4 275, v5e 197, v5p 459, v6e (Trillium) 918.
PEAK_BF16 = {
    'NVIDIA H100': 989.4e12, 'NVIDIA H100 PCIe': 756e12, 'NVIDIA H100 NVL': 835e12,
    'NVIDIA H200': 989.4e12, 'NVIDIA GH200': 989.4e12, 'NVIDIA A100': 312e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5': 459e12, 'TPU v6 lite': 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  """The datasheet dense bf16 rate of a chip named `device_kind`, or None if unknown."""
  best = max((k for k in PEAK_BF16 if device_kind.startswith(k)), key=len, default=None)
  return PEAK_BF16[best] if best else None


def default_matmul_dtype():
  return jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16


# ---------------------------------------------------------------- analytic FLOPs

def matmul_params(model_cfg) -> int:
  """N above: the matmul parameters one token uses (lm head included, embedding not)."""
  m = model_cfg
  head_dim = m.d_model // m.num_heads
  attn = m.d_model * (m.num_heads + 2 * m.num_kv_heads) * head_dim + \
      m.num_heads * head_dim * m.d_model
  dense_ffn = 3 * m.d_model * m.d_ff
  moe = set(config_lib.moe_layers(m))
  n = 0
  for i in range(m.num_layers):
    n += attn
    if i in moe:
      e = m.moe
      f = e.d_expert or m.d_ff
      per_token = {'token_choice': e.top_k, 'expert_choice': e.top_k * e.capacity_factor,
                   'soft': m.num_experts}[e.router]
      n += m.d_model * m.num_experts + round(per_token * 3 * m.d_model * f)
      n += 3 * m.d_model * f * e.num_shared_experts
    else:
      n += dense_ffn
  return n + m.d_model * m.vocab_size


def flops_per_token(cfg) -> float:
  m = cfg.model
  return 6.0 * matmul_params(m) + 12.0 * m.num_layers * cfg.data.seq_len * m.d_model


def flops_per_step(cfg) -> float:
  return flops_per_token(cfg) * cfg.data.batch_size * cfg.data.seq_len


# ---------------------------------------------------------------- all-to-all bytes in HLO

DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
               's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
               'c128': 16}
_SHAPE = re.compile(r'\b(' + '|'.join(DTYPE_BYTES) + r')\[([0-9,]*)\]')
_A2A = re.compile(r'=\s*(.*?)\s+all-to-all(-start)?\(')


def shape_bytes(text: str) -> int:
  """Bytes of every array shape written in `text`, e.g. 'f32[8,16]' -> 512."""
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return total


def all_to_all_bytes(hlo_text: str) -> tuple[int, int]:
  """(number of all-to-all ops, sum of their operand bytes) in one device's HLO program.

  An all-to-all's result has the operand's shapes (array or tuple form), so the result
  type is read. The async form's `all-to-all-start` result holds operands and outputs,
  so half of it is counted; `-done` is skipped.
  """
  count, total = 0, 0
  for line in hlo_text.splitlines():
    match = _A2A.search(line)
    if not match:
      continue
    b = shape_bytes(match.group(1))
    count += 1
    total += b // 2 if match.group(2) else b
  return count, total


def min_all_to_all_bytes(cfg, num_devices: int, expert_parallel: int,
                         itemsize: int = 4) -> int:
  """Least per-device all-to-all operand bytes a train step needs: per MoE layer, each of
  the device's T_local tokens sends k rows of d_model to their experts and gets k back
  (forward, 2 directions) and the backward pass moves the same two cotangents (2 more):
  4 * T_local * k * d_model * itemsize per layer. Of every operand, the block addressed to
  the device itself (1/ep) does not cross the wire; both sides of the ratio include it."""
  del expert_parallel
  m = cfg.model
  tokens_local = cfg.data.batch_size * cfg.data.seq_len // num_devices
  layers = len(config_lib.moe_layers(m))
  return 4 * layers * tokens_local * m.moe.top_k * m.d_model * itemsize


# ---------------------------------------------------------------- timing a train step

def random_batch(cfg, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  b, l = cfg.data.batch_size, cfg.data.seq_len
  tokens = rng.integers(0, cfg.model.vocab_size, (b, l + 1), dtype=np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], mask=np.ones((b, l), np.float32))


class StepBench:
  """A compiled train step of one config with its state and batch, ready to be timed."""

  def __init__(self, name: str, cfg, devices=None):
    from moetrain import optimizer as optimizer_lib
    from moetrain import state as state_lib
    from moetrain import step as step_lib
    from moetrain.parallel import mesh as mesh_lib
    self.name, self.cfg = name, cfg
    self.mesh = mesh_lib.make_mesh(cfg, devices)
    tx = optimizer_lib.make_optimizer(cfg.train)
    graphdef, self.state, shardings = state_lib.init_state(cfg, self.mesh, tx)
    self.batch = jax.device_put(random_batch(cfg), mesh_lib.batch_sharding(self.mesh))
    step = step_lib.jit_train_step(graphdef, tx, cfg, shardings)
    t0 = time.perf_counter()
    with jax.set_mesh(self.mesh):
      self.compiled = step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - t0
    self.times: list[float] = []
    self.rounds: list[dict] = []

  def hlo_text(self) -> str:
    return self.compiled.as_text()

  def run(self, steps: int, record: bool = True):
    """Runs `steps` steps, blocking on each; records each step's seconds."""
    for _ in range(steps):
      t0 = time.perf_counter()
      self.state, metrics = self.compiled(self.state, self.batch)
      jax.block_until_ready((self.state, metrics))
      if record:
        self.times.append(time.perf_counter() - t0)
    return metrics

  def run_round(self, steps: int, matmul_flops_per_s: float):
    """One round: `steps` timed steps, paired with the matmul rate measured just before."""
    start = len(self.times)
    self.run(steps)
    self.rounds.append(dict(step_s=statistics.median(self.times[start:]),
                            matmul_flops_per_s=matmul_flops_per_s))

  def result(self, peak: float | None = None) -> dict:
    """Medians over all steps (step_s) and over rounds (mfu: each round's step time against
    the matmul rate measured right before it, which cancels most of the machine's load);
    mfu_peak against `peak` FLOP/s (the datasheet rate, `peak_flops`), None without one."""
    tokens = self.cfg.data.batch_size * self.cfg.data.seq_len
    step_s = statistics.median(self.times)
    flops = flops_per_step(self.cfg)
    mfu = statistics.median(flops / r['step_s'] / r['matmul_flops_per_s']
                            for r in self.rounds)
    return dict(config=self.name, compile_s=self.compile_s, step_s=step_s,
                step_s_all=self.times, rounds=self.rounds, tokens_per_step=tokens,
                tokens_per_s=tokens / step_s, model_flops_per_step=flops,
                model_flops_per_s=flops / step_s, mfu=mfu,
                mfu_peak=flops / step_s / peak if peak else None,
                step_memory_bytes=self.step_memory_bytes())

  def step_memory_bytes(self) -> int | None:
    """Device bytes the compiled step plans for: its arguments (the state and the batch),
    outputs not aliased to them, and temporaries (XLA's memory_analysis of this program
    alone, so one config's number does not include another's state)."""
    m = self.compiled.memory_analysis()
    if m is None:
      return None
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)


def paired_ratio(a: dict, b: dict) -> float:
  """Median over rounds of step(a) / step(b), both from the same round."""
  return statistics.median(ra['step_s'] / rb['step_s']
                           for ra, rb in zip(a['rounds'], b['rounds']))


# ---------------------------------------------------------------- output

def table(result: dict) -> str:
  """Plain-text table of a bench result (the dict written as JSON)."""
  rate = result['matmul']
  lines = [f"machine: {result['backend']} x{result['devices']}, matmul {rate['n']}^3 "
           f"{rate['dtype']}: {rate['flops_per_s'] / 1e9:.1f} GFLOP/s (median of "
           f"{len(rate['all'])})"]
  if 'd_model' in result:
    lines.append(f"configs: d_model {result['d_model']}, batch {result['batch_size']} x 256 "
                 f"tokens, {result.get('dtype', 'float32')}; MFU and R1/R2 are medians over "
                 'rounds of same-round pairs')
  if result.get('peak_flops_per_s'):
    lines.append(f"datasheet peak ({result['device_kind']}): "
                 f"{result['peak_flops_per_s'] / 1e12:.1f} TFLOP/s bf16 dense; MFU/peak "
                 'against it, MFU against the measured matmul rate')
  width = max([14] + [len(r['config']) + 2 for r in result['configs']])
  lines += ['',
           f"{'config':<{width}}{'compile s':>10}{'step ms':>10}{'tokens/s':>11}"
           f"{'GFLOP/step':>12}{'GFLOP/s':>9}{'MFU':>7}{'MFU/peak':>9}{'mem GiB':>9}"]
  for r in result['configs']:
    peak, memory = r.get('mfu_peak'), r.get('step_memory_bytes')
    lines.append(f"{r['config']:<{width}}{r['compile_s']:>10.1f}{r['step_s'] * 1e3:>10.1f}"
                 f"{r['tokens_per_s']:>11,.0f}{r['model_flops_per_step'] / 1e9:>12.2f}"
                 f"{r['model_flops_per_s'] / 1e9:>9.1f}{r['mfu']:>7.2f}"
                 f"{'n/a' if peak is None else f'{peak:.3f}':>9}"
                 f"{'n/a' if memory is None else f'{memory / 2**30:.1f}':>9}")
  lines.append('')
  for key, r in result['ratios'].items():
    ok = {True: 'ok', False: 'MISSED', None: 'n/a'}[r.get('ok')]
    value = 'n/a' if r['value'] is None else f"{r['value']:.3f}"
    lines.append(f"{key:<3} {r['what']:<56} {value:>7}  target {r['target']:<7} {ok}")
  return '\n'.join(lines)


def ratio(what: str, value, target: str) -> dict:
  if value is None:
    return dict(what=what, value=None, target=target, ok=None)
  op, bound = target[:2], float(target[2:])
  return dict(what=what, value=value, target=target,
              ok=bool(value <= bound if op == '<=' else value >= bound))


def write_json(result: dict, path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=2, sort_keys=True))
  return path
