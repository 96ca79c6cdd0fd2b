"""Where a train step's time goes, by category, from a profiler trace and the compiled HLO.

Categories (`CATEGORIES`): attention, expert_matmul, dispatch_combine (router included),
all_to_all (all-to-all and ragged-all-to-all), collectives (every other collective), optimizer,
rest. An HLO instruction's category comes from its opcode (collectives) or else from the
innermost named scope in its op_name metadata (`SCOPE_CATEGORY`; the model and the train step
set the scopes with `jax.named_scope`, so backward ops carry them too, e.g.
`transpose(jvp(experts))/dot_general`).

Pieces, each pure:
- `instructions(hlo_text)`: instruction name -> `Instruction` (opcode, op_name) for every
  computation of the compiled module. A fusion (or any op that calls a computation) without
  metadata takes its called computation's root's; async wrappers (`async-start`/`-done`) take
  the opcode of the collective they wrap.
- `device_events(trace)`: the op events of a Chrome-format trace (`*.trace.json.gz`, what
  `jax.profiler.stop_trace` writes), each with the HLO instruction it ran, from:
  * CPU: events of the `/host:CPU` process whose args hold `hlo_op` (XLA:CPU's thunk executor
    names each event after its instruction and adds args `hlo_op`, `hlo_module`,
    `device_ordinal`, `run_id`; measured here with jax 0.10.2).
  * GPU: events on the `Stream #N(...)` threads of the `/device:GPU:N` processes (the CUPTI
    collector, xla/backends/profiler/gpu/cupti_collector.cc, puts kernel, memcpy and memset
    activity on lines named "Stream #<id>(<types>)"). The event name is the CUDA kernel's
    (`nvjet_*`, `sm90_xmma_*`, `loop_fusion_*`, `ncclDevKernel_*`, cuDNN's
    `cudnn_generated_*`), so the instruction is read from the args: the collector parses the
    launch's annotation stack, `XlaModule:#prefix=...,hlo_module=M,program_id=P#::
    Thunk:#name=<op_name>,hlo_op=<instruction>#` (xla/backends/gpu/runtime/annotation.cc),
    into one arg per key (`hlo_op`, `hlo_module`, `name`, `program_id`, `prefix`) plus
    `tf_op`, `correlation_id`, `context_id`; cuBLAS and cuDNN kernels run inside their
    custom-call thunk and carry its `hlo_op` the same way. Under an active profiler XLA runs
    command buffers (CUDA graphs) thunk by thunk (CommandBufferThunk::ExecuteOnStream), so
    each kernel keeps its own annotation. Without `hlo_op` the kernel name is tried as an
    instruction name (`loop_fusion_3` -> `loop_fusion.3`).
  * TPU: events on the `XLA Ops` line of `/device:TPU:N`, named by instruction.
  The GPU and TPU shapes are read from the XLA sources cited, not yet from a trace of this
  project (no GPU when this was written): the UNATTRIBUTED line of a GPU run says whether
  they hold, and names the largest events it could not map.
- `breakdown(events, instrs, steps, ...)`: per-category milliseconds per step and device
  (self time: an event's time minus the events nested in it on the same thread, so a
  while loop's body is not counted twice), their shares of the op time, the device busy
  time (union of the op intervals), and the UNATTRIBUTED time: events whose instruction is
  not in the module (a non-zero value says the event filter misses part of the device).

Independent ops overlap on the CPU thread pool and on GPU streams, so the op time can
exceed the busy time and the step time: read shares as proportions.
"""

from __future__ import annotations

import collections
import dataclasses
import re

CATEGORIES = ('attention', 'expert_matmul', 'dispatch_combine', 'all_to_all', 'collectives',
              'optimizer', 'rest')
SCOPES = ('attention', 'attn_proj', 'router', 'dispatch', 'experts', 'combine', 'optimizer',
          'loss')  # the jax.named_scope labels of moetrain.model and moetrain.step
SCOPE_CATEGORY = {'attention': 'attention', 'experts': 'expert_matmul',
                  'router': 'dispatch_combine', 'dispatch': 'dispatch_combine',
                  'combine': 'dispatch_combine', 'optimizer': 'optimizer'}
ALL_TO_ALL = ('all-to-all', 'ragged-all-to-all')
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute',
               'collective-broadcast')
ASYNC = ('async-start', 'async-update', 'async-done')

_SCOPE = re.compile(r'(?<![\w.])(' + '|'.join(SCOPES) + r')(?![\w.])')
_HEADER = re.compile(r'^(?:ENTRY\s+)?%?([^\s(]+)\s*\(.*->.*\{\s*$')
_INSTR = re.compile(r'^\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$')
_OP_NAME = re.compile(r'\bop_name="((?:[^"\\]|\\.)*)"')
_CALLS = re.compile(r'\bcalls=\{?%?([^\s,}]+)')
_MODULE = re.compile(r'^HloModule\s+([^\s,]+)')
_OPCODE = re.compile(r'[^\s(]*\s+([\w\-]+)\(')


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One HLO instruction: its opcode (an async wrapper's is the wrapped op's) and the
  op_name of its metadata ('' when it has none)."""
  name: str
  opcode: str
  op_name: str


def scope_of(op_name: str) -> str | None:
  """The innermost `SCOPES` label in an op_name path, e.g. 'jit(step)/transpose(jvp(
  attention))/dot_general' -> 'attention'; None when it has none."""
  found = _SCOPE.findall(op_name)
  return found[-1] if found else None


def base_opcode(opcode: str) -> str:
  """A collective's opcode without its async suffix: 'all-gather-start' -> 'all-gather'."""
  for suffix in ('-start', '-done', '-update'):
    if opcode.endswith(suffix) and opcode not in ASYNC:
      return opcode[:-len(suffix)]
  return opcode


def category(opcode: str, op_name: str) -> str:
  """The category (`CATEGORIES`) of an instruction from its opcode and op_name."""
  base = base_opcode(opcode)
  if base in ALL_TO_ALL:
    return 'all_to_all'
  if base in COLLECTIVES:
    return 'collectives'
  return SCOPE_CATEGORY.get(scope_of(op_name), 'rest')


def _opcode(rest: str) -> str:
  """The opcode of an instruction line's right-hand side 'TYPE opcode(operands), ...' (a
  tuple TYPE is parenthesized and may hold spaces)."""
  start = 0
  if rest.startswith('('):
    depth = 0
    for start, ch in enumerate(rest, 1):
      depth += {'(': 1, ')': -1}.get(ch, 0)
      if depth == 0:
        break
  match = _OPCODE.match(rest, start)
  return match.group(1) if match else ''


def module_name(hlo_text: str) -> str:
  """The name on the HloModule line ('jit_train_step'), '' when there is none."""
  for line in hlo_text.splitlines():
    match = _MODULE.match(line)
    if match:
      return match.group(1)
  return ''


def instructions(hlo_text: str) -> dict[str, Instruction]:
  """Instruction name -> Instruction, over every computation of the module's HLO text."""
  raw = {}  # name -> (opcode, op_name, called computation, first operand)
  roots = {}  # computation -> its root instruction
  computation = None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and ' = ' not in line.split('(')[0]:
      computation = header.group(1)
      continue
    match = _INSTR.match(line)
    if not match or computation is None:
      continue
    is_root, name, rest = match.groups()
    op_name = _OP_NAME.search(rest)
    calls = _CALLS.search(rest)
    opcode = _opcode(rest)
    operand = re.search(re.escape(opcode) + r'\(\s*%?([^\s,)]+)', rest) if opcode else None
    raw[name] = (opcode, op_name.group(1) if op_name else '', calls and calls.group(1),
                 operand and operand.group(1))
    if is_root:
      roots[computation] = name

  def resolve(name, depth=0):
    opcode, op_name, calls, operand = raw[name]
    if depth > 8:
      return opcode, op_name
    inner = roots.get(calls) if calls else None
    if opcode in ASYNC and inner is None and operand in raw:  # async-done(async-start)
      return resolve(operand, depth + 1)
    if inner is not None:
      inner_opcode, inner_op_name = resolve(inner, depth + 1)
      if opcode in ASYNC:
        opcode = inner_opcode
      op_name = op_name or inner_op_name
    return opcode, op_name

  return {name: Instruction(name, *resolve(name)) for name in raw}


@dataclasses.dataclass(frozen=True)
class Event:
  """One op event: where it ran (`device`: a device process or CPU device ordinal; `thread`),
  when (microseconds), the instruction it names (`op`, '' if none), its module ('' if not
  given) and the event's own name."""
  device: str
  thread: str
  ts: float
  dur: float
  op: str
  module: str
  name: str


def _meta_names(trace_events, kind):
  return {(e.get('pid'), e.get('tid')) if kind == 'thread_name' else e.get('pid'):
          e.get('args', {}).get('name', '')
          for e in trace_events if e.get('ph') == 'M' and e.get('name') == kind}


def device_events(trace: dict) -> list[Event]:
  """The op events of a trace (see the module docstring): GPU stream or TPU op-line events
  when the trace has device processes with them, else the CPU events that name an HLO op."""
  trace_events = trace['traceEvents'] if isinstance(trace, dict) else trace
  processes = _meta_names(trace_events, 'process_name')
  threads = _meta_names(trace_events, 'thread_name')
  device_pids = {pid for pid, name in processes.items()
                 if '/device:GPU' in name or '/device:TPU' in name}

  spans = [e for e in trace_events if e.get('ph') == 'X' and 'dur' in e]
  on_device = [(e, threads.get((e['pid'], e.get('tid')), '')) for e in spans
               if e.get('pid') in device_pids]
  # GPU: the CUDA stream lines (a viewer may add derived 'XLA Ops' lines beside them,
  # which would count the kernels twice); TPU: the 'XLA Ops' line.
  device = [e for e, line in on_device if line.startswith('Stream')]
  if not device:
    device = [e for e, line in on_device if line == 'XLA Ops']
  out = []
  if device:
    for e in device:
      args = e.get('args', {})
      out.append(Event(processes[e['pid']], str(e['tid']), float(e['ts']), float(e['dur']),
                       str(args.get('hlo_op', '')), str(args.get('hlo_module', '')),
                       e.get('name', '')))
    return out
  for e in spans:
    args = e.get('args', {})
    if 'hlo_op' in args:
      out.append(Event(f"cpu:{args.get('device_ordinal', '0')}", str(e['tid']),
                       float(e['ts']), float(e['dur']), str(args['hlo_op']),
                       str(args.get('hlo_module', '')), e.get('name', '')))
  return out


def self_times(events: list[Event]) -> list[float]:
  """Each event's duration minus that of the events nested directly inside it on the same
  (device, thread), in the order of `events`."""
  result = [e.dur for e in events]
  by_thread = collections.defaultdict(list)
  for i, e in enumerate(events):
    by_thread[(e.device, e.thread)].append(i)
  for indices in by_thread.values():
    indices.sort(key=lambda i: (events[i].ts, -events[i].dur))
    stack = []
    for i in indices:
      e = events[i]
      while stack and events[stack[-1]].ts + events[stack[-1]].dur <= e.ts:
        stack.pop()
      if stack:
        result[stack[-1]] -= e.dur
      stack.append(i)
  return [max(r, 0.0) for r in result]


def busy_time(events: list[Event]) -> float:
  """Microseconds in which at least one event runs, summed over devices."""
  total = 0.0
  by_device = collections.defaultdict(list)
  for e in events:
    by_device[e.device].append((e.ts, e.ts + e.dur))
  for intervals in by_device.values():
    intervals.sort()
    start, end = intervals[0]
    for s, t in intervals[1:]:
      if s > end:
        total += end - start
        start, end = s, t
      else:
        end = max(end, t)
    total += end - start
  return total


def instruction_of(event: Event, instrs: dict[str, Instruction],
                   module: str = '') -> Instruction | None:
  """The instruction an event ran: its `hlo_op`, else its name as an instruction name (or
  with a kernel's `_N` suffix read as `.N`); None when the event belongs to another module
  or names no instruction of this one."""
  if module and event.module and event.module != module:
    return None
  for name in (event.op, event.name, re.sub(r'_(\d+)$', r'.\1', event.name)):
    if name and name in instrs:
      return instrs[name]
  return None


def breakdown(events: list[Event], instrs: dict[str, Instruction], steps: int,
              module: str = '', step_s: float | None = None) -> dict:
  """Per-category ms per step and device from op events and the module's instructions.

  Returns a dict: steps, devices (how many), device_names (where the events ran: GPU or TPU
  processes, or 'cpu:N' for CPU device ordinals), step_ms (from `step_s`, the measured step time, if given),
  busy_ms, op_ms (summed self time), unattributed_ms, categories {category: ms},
  shares {category: share of op_ms} (and 'unattributed'), scopes {scope or '-': ms},
  per_op {instruction: ms}, unattributed_top [(event name, ms)] (the 10 largest; an event
  of another module is named 'name [module]').
  """
  devices = max(len({e.device for e in events}), 1)
  scale = 1e-3 / (steps * devices)  # microseconds over all steps and devices -> ms
  categories = dict.fromkeys(CATEGORIES, 0.0)
  scopes = collections.Counter()
  per_op = collections.Counter()
  missing = collections.Counter()
  for e, t in zip(events, self_times(events)):
    ins = instruction_of(e, instrs, module)
    if ins is None:
      other = e.module and module and e.module != module
      missing[f'{e.name or e.op} [{e.module}]' if other else e.name or e.op] += t * scale
      continue
    categories[category(ins.opcode, ins.op_name)] += t * scale
    scopes[scope_of(ins.op_name) or '-'] += t * scale
    per_op[ins.name] += t * scale
  unattributed = sum(missing.values())
  op_ms = sum(categories.values()) + unattributed
  shares = {k: (v / op_ms if op_ms else 0.0) for k, v in categories.items()}
  shares['unattributed'] = unattributed / op_ms if op_ms else 0.0
  return dict(steps=steps, devices=devices, device_names=sorted({e.device for e in events}),
              step_ms=None if step_s is None else step_s * 1e3,
              busy_ms=busy_time(events) * scale, op_ms=op_ms, unattributed_ms=unattributed,
              categories=categories, shares=shares, scopes=dict(scopes.most_common()),
              per_op=dict(per_op.most_common()), unattributed_top=missing.most_common(10))


def format_table(result: dict) -> str:
  """The breakdown as a small text table (ms per step and device, and shares of op time),
  the time by named scope ('-': none), and the largest unattributed events."""
  step = result['step_ms']
  lines = [f"step {'-' if step is None else f'{step:.1f}'} ms, device busy "
           f"{result['busy_ms']:.1f} ms, op time {result['op_ms']:.1f} ms "
           f"(per step and device; {result['steps']} steps; events of "
           f"{', '.join(result['device_names']) or 'no device'})",
           f"{'category':<18}{'ms/step':>10}{'share':>8}"]
  for name in CATEGORIES:
    lines.append(f"{name:<18}{result['categories'][name]:>10.2f}"
                 f"{result['shares'][name]:>8.1%}")
  lines.append(f"{'UNATTRIBUTED':<18}{result['unattributed_ms']:>10.2f}"
               f"{result['shares']['unattributed']:>8.1%}")
  lines.append('by scope: ' + ', '.join(f'{name} {ms:.2f}'
                                        for name, ms in result['scopes'].items()))
  for name, ms in result['unattributed_top'][:5]:
    lines.append(f'  unattributed {ms:8.2f} ms  {name[:90]}')
  return '\n'.join(lines)
