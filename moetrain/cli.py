"""The `moetrain` command: `moetrain train|sweep|report|eval|analyze|sample|params|tokenizer
train|data prepare|export|import --config=configs/x.py [--config.a.b=v]`.

Config files are read with ml_collections `config_flags`, so any key can be overridden on
the command line; unknown keys and bad values stop the command with one sentence before
anything compiles. `eval`, `analyze` and `sample` read the run's own config
(WORKDIR/config.json) and take `--config.a.b=v` overrides of it.
"""

from __future__ import annotations

import difflib
import pathlib
import sys
import traceback

from absl import flags
from ml_collections import config_flags

from moetrain import config as config_lib

COMMANDS = {
    'train': 'train a model: --config=FILE --workdir=DIR',
    'sweep': 'train a grid of overrides, then a table and plots: --config=FILE '
             '--workdir=DIR --sweep=KEY=V1,V2 [--sweep=...]',
    'report': 'rebuild the table and plots of a sweep: --workdir=DIR',
    'eval': 'loss, perplexity and bits per byte of a trained run: --workdir=DIR '
            '[--eval_batches=N] [--config.data.KEY=V ...]',
    'analyze': 'what the experts learned (specialization, expert ablation, capacity, '
               'cross-layer routing) into DIR/analysis/: --workdir=DIR [--eval_batches=N] '
               '[--config.data.KEY=V ...]',
    'sample': 'continue prompts with a trained run: --workdir=DIR --prompt=TEXT [--prompt=...] '
              '[--prompts_file=PATH --max_new_tokens=N --temperature=T --top_k=K --top_p=P '
              '--seed=S]',
    'params': 'print total and active parameters and training FLOPs per token',
    'compile': 'compile the train step ahead of time and print per-chip memory, FLOPs and '
               'collectives: [--topology=v5p-128 [--num_slices=N]] (default: local devices) '
               '[--dump=DIR]',
    'tokenizer': "'tokenizer train': fit a byte-level BPE on the configured corpus: "
                 '--vocab_size=N --output=PATH',
    'data': "'data prepare': tokenize the configured source once into token shards for "
            "data.source='prepared': --output=DIR",
    'export': 'write a run as a Hugging Face model directory: --workdir=DIR --output=DIR '
              '[--format=auto|llama|mistral|mixtral|qwen3_moe|qwen2_moe --inexact]',
    'import': 'read a Hugging Face model directory into a new run at step 0: --from=DIR '
              '--workdir=DIR [--config=FILE]',
}
SUBCOMMANDS = {'tokenizer': ('train',), 'data': ('prepare',)}
MULTI_PROCESS_FLAGS = ('coordinator_address', 'num_processes', 'process_id', 'distributed',
                       'heartbeat_timeout')
# The flags each command reads (`moetrain COMMAND --help` lists them); a command missing
# here lists every flag.
COMMAND_FLAGS = {
    'train': ('config', 'workdir', *MULTI_PROCESS_FLAGS),
    'sweep': ('config', 'workdir', 'sweep', *MULTI_PROCESS_FLAGS),
    'report': ('workdir',),
    'eval': ('workdir', 'eval_batches'),
    'analyze': ('workdir', 'eval_batches'),
    'sample': ('workdir', 'prompt', 'prompts_file', 'max_new_tokens', 'temperature', 'top_k',
               'top_p', 'seed', 'kv_cache'),
    'params': ('config',),
    'compile': ('config', 'topology', 'num_slices', 'dump'),
    'tokenizer train': ('config', 'vocab_size', 'output'),
    'data prepare': ('config', 'output'),
    'export': ('workdir', 'output', 'format', 'inexact'),
    'import': ('from', 'workdir', 'config'),
}
HELP_ARGS = ('--help', '-h', '--helpfull', '--helpshort')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for logs and checkpoints.')
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', None, 'tokenizer train: vocabulary size.')
_OUTPUT = flags.DEFINE_string('output', None, 'tokenizer train: path of the .json to write; '
                              'data prepare and export: the directory to write.')
_FORMAT = flags.DEFINE_string('format', 'auto', 'export: auto (from the config), llama, '
                              'mistral, mixtral, qwen3_moe or qwen2_moe.')
_INEXACT = flags.DEFINE_bool('inexact', False, 'export: write a model whose transformers '
                             'outputs differ from moetrain\'s (the differences are printed).')
_FROM = flags.DEFINE_string('from', None, 'import: the Hugging Face model directory to read.')
_SWEEP = flags.DEFINE_multi_string('sweep', [], 'sweep: KEY=V1,V2,... (repeat for a grid).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'multi-process: HOST:PORT of process 0 (with '
    '--num_processes and --process_id); not needed on TPU pods and SLURM.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'multi-process: process count.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'multi-process: this process index.')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout', 10, 'multi-process: seconds without a heartbeat after which a '
    'process counts as dead and the others stop, naming it.')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'sample: a text to continue (repeat for '
                                     'a batch of prompts).')
_PROMPTS_FILE = flags.DEFINE_string('prompts_file', None, 'sample: a file of prompts, one '
                                    'per line (\\n in a line is a newline).')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 200, 'sample: tokens to generate.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'sample: 0 is greedy.')
_TOPOLOGY = flags.DEFINE_string(
    'topology', None, 'compile: a TPU slice (v5p-128, v4-32, v5e-16, v6e-64, or a libtpu '
    'name such as v5p:4x4x4), compiled on this host; needs the tpu extra.')
_NUM_SLICES = flags.DEFINE_integer('num_slices', 1, 'compile: slices of --topology '
                                   '(multi-slice; data parallelism spans them).')
_DUMP = flags.DEFINE_string('dump', None, "compile: a directory for XLA's dump of the "
                            'compiled step (HLO, buffer assignment, memory-usage report).')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'sample: draw from the k most likely tokens; 0: all.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'sample: draw from the smallest set of tokens whose '
                            'probabilities sum to at least p; 1.0: all.')
_SEED = flags.DEFINE_integer('seed', 0, 'sample: the random seed of the draws.')
_KV_CACHE = flags.DEFINE_bool('kv_cache', True, 'sample: encode each context once and decode '
                              'one position per token (False: rerun the whole context).')
_EVAL_BATCHES = flags.DEFINE_integer('eval_batches', None, 'eval, analyze: batches to read '
                                     "(default: the run's train.eval_batches).")
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'multi-process with the cluster detected by JAX (Cloud TPU pod '
    'slices, SLURM, Open MPI) or given by JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and '
    'JAX_PROCESS_ID.')


def _require_workdir(command: str):
  """--workdir is given, and usable when it is in a bucket (gs://, with the gcp extra)."""
  if not _WORKDIR.value:
    raise config_lib.ConfigError(f'--workdir is required for {command}; pass --workdir=DIR.')
  from moetrain import paths
  paths.check(_WORKDIR.value)


def _initialize_processes():
  """Joins the other processes of a multi-process run before jax touches a device."""
  from moetrain.parallel import distributed
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         auto=_DISTRIBUTED.value, heartbeat_timeout=_HEARTBEAT_TIMEOUT.value)


def _train(_):
  from moetrain import train
  _require_workdir('train')
  config_lib.validate(_CONFIG.value)
  _initialize_processes()
  train.train(_CONFIG.value, _WORKDIR.value, log=_process_zero_print())


def _process_zero_print():
  """print on process 0; the other processes of a multi-process run stay quiet."""
  import jax
  return print if jax.process_index() == 0 else (lambda *args, **kwargs: None)


def _sweep(_):
  from moetrain import sweep
  _require_workdir('sweep')
  if not _SWEEP.value:
    raise config_lib.ConfigError('sweep needs at least one --sweep=KEY=V1,V2; e.g. '
                                 '--sweep=model.num_experts=4,8,16.')
  _initialize_processes()
  sweep.sweep(_CONFIG.value, _SWEEP.value, _WORKDIR.value, log=_process_zero_print())


def _run_overrides(args: list[str]) -> dict:
  """`--config.KEY=VALUE` arguments -> {KEY: value}, each value parsed by ml_collections
  with the type of the key in the default config."""
  if not args:
    return {}
  values = flags.FlagValues()
  config_flags.DEFINE_config_dict('config', config_lib.default_config(), flag_values=values)
  values(['moetrain', *args])
  keys = [a[len('--config.'):].split('=', 1)[0] for a in args]
  return {key: config_lib.get_key(values.config, key) for key in keys}


def _eval(_):
  from moetrain import evaluate
  _require_workdir('eval')
  run, totals = evaluate.evaluate_workdir(_WORKDIR.value, _run_overrides(_OVERRIDES),
                                          _EVAL_BATCHES.value)
  for line in evaluate.report_lines(run, totals):
    print(line)


def _analyze(_):
  from moetrain.analysis import analyze, report
  _require_workdir('analyze')
  result = analyze.analyze(_WORKDIR.value, _run_overrides(_OVERRIDES), _EVAL_BATCHES.value)
  print()
  for line in report.summary_lines(result):
    print(line)
  print(f'\nwrote {pathlib.Path(_WORKDIR.value) / "analysis"}: analysis.json, summary.md, '
        'specialization_layer*.png, ablation.png, capacity.png')


def _prompts() -> list[str]:
  """The --prompt values, then the lines of --prompts_file."""
  prompts = list(_PROMPT.value)
  if _PROMPTS_FILE.value:
    path = pathlib.Path(_PROMPTS_FILE.value)
    if not path.is_file():
      raise config_lib.ConfigError(f'--prompts_file={path} does not exist; pass a text file '
                                   'with one prompt per line.')
    prompts += [line.replace('\\n', '\n') for line in path.read_text().splitlines() if line]
  if not prompts:
    raise config_lib.ConfigError('sample needs --prompt=TEXT (or --prompts_file=PATH); e.g. '
                                 '--prompt="def main(".')
  return prompts


def _sample(_):
  from moetrain import sample
  _require_workdir('sample')
  prompts = _prompts()
  sampler = sample.Sampler(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  texts = sample.sample(_WORKDIR.value, prompts, max_new_tokens=_MAX_NEW_TOKENS.value,
                        sampler=sampler, seed=_SEED.value, kv_cache=_KV_CACHE.value,
                        overrides=_run_overrides(_OVERRIDES))
  for i, (prompt, text) in enumerate(zip(prompts, texts)):
    if len(prompts) > 1:
      print(f'--- sample {i + 1} of {len(prompts)} ---')
    print(prompt + text)


def _report(_):
  from moetrain import sweep
  _require_workdir('report')
  sweep.report(_WORKDIR.value)


def _params(_):
  from moetrain import counting, data
  cfg = data.resolve_vocab(config_lib.validate(_CONFIG.value))
  for line in counting.count(cfg).lines():
    print(line)


def _compile(_):
  import os
  if _TOPOLOGY.value:  # compile-only TPU devices; the host's own backend stays CPU, and
    # other processes may use libtpu at the same time (no TPU is touched).
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from moetrain import compile as compile_lib
  if _NUM_SLICES.value < 1 or (_NUM_SLICES.value > 1 and not _TOPOLOGY.value):
    raise config_lib.ConfigError(f'--num_slices={_NUM_SLICES.value} needs a --topology and '
                                 'a positive count; pass e.g. --topology=v5p-128 '
                                 '--num_slices=2.')
  report, _ = compile_lib.compile_step(_CONFIG.value, _TOPOLOGY.value, _NUM_SLICES.value,
                                       dump=_DUMP.value)
  for line in report.lines():
    print(line)


def _tokenizer_train(_):
  from moetrain import data
  if not _VOCAB_SIZE.value or not _OUTPUT.value:
    raise config_lib.ConfigError('tokenizer train needs --vocab_size=N and --output=PATH; '
                                 'pass both.')
  cfg = config_lib.validate(_CONFIG.value)
  tokenizer = data.train_tokenizer(cfg, _VOCAB_SIZE.value, _OUTPUT.value)
  print(f'wrote {_OUTPUT.value}: {tokenizer.vocab_size} tokens, end of document id '
        f'{tokenizer.eod_id}; use it with --config.data.tokenizer={_OUTPUT.value}')


def _data_prepare(_):
  from moetrain.data import prepare
  if not _OUTPUT.value:
    raise config_lib.ConfigError('data prepare needs --output=DIR, the directory to write the '
                                 'token files to; pass it.')
  cfg = config_lib.validate(_CONFIG.value)
  prepare.prepare(cfg, _OUTPUT.value, progress=cfg.train.progress)
  print(f"train from it with --config.data.source=prepared --config.data.paths={_OUTPUT.value}")


def _export(_):
  _require_workdir('export')
  if not _OUTPUT.value:
    raise config_lib.ConfigError('export needs --output=DIR, a new directory to write.')
  from moetrain.interop import hf
  hf.export(_WORKDIR.value, _OUTPUT.value, fmt=_FORMAT.value, inexact=_INEXACT.value)


def _import(_):
  _require_workdir('import')
  if not _FROM.value:
    raise config_lib.ConfigError('import needs --from=DIR, a Hugging Face model directory.')
  from moetrain.interop import hf
  hf.import_model(_FROM.value, _WORKDIR.value, _CONFIG.value)


RUNNERS = {'train': _train, 'sweep': _sweep, 'report': _report, 'eval': _eval,
           'analyze': _analyze, 'sample': _sample, 'params': _params, 'compile': _compile,
           'tokenizer train': _tokenizer_train, 'data prepare': _data_prepare,
           'export': _export, 'import': _import}
# commands on a trained run: its config, plus overrides.
RUN_COMMANDS = ('eval', 'analyze', 'sample')
_OVERRIDES: list[str] = []  # their `--config.KEY=VALUE` arguments.


def _runtime_errors() -> tuple:
  """Errors that stop a command with one sentence (exit 1) instead of a traceback: a
  checkpoint folder that cannot be resumed, a diverged run, a workdir that is locked or
  refuses writes, a step that does not fit (from modules already imported, so `params`
  never imports jax for this)."""
  names = (('moetrain.checkpoint', 'CheckpointError'), ('moetrain.guard', 'DivergenceError'),
           ('moetrain.workdir', 'WorkdirError'), ('moetrain.compile', 'DoesNotFitError'))
  return tuple(getattr(sys.modules[m], n) for m, n in names if m in sys.modules)


def _usage() -> str:
  lines = ['usage: moetrain COMMAND --config=configs/FILE.py [--config.KEY=VALUE ...]', '']
  lines += [f'  {name:<9} {help_}' for name, help_ in COMMANDS.items()]
  lines += ['', '`moetrain COMMAND --help` lists the flags of a command.']
  return '\n'.join(lines)


def _command_help(command: str) -> str:
  """`moetrain COMMAND --help`: what the command does and the flags it reads."""
  head = command.split()[0]
  names = COMMAND_FLAGS.get(command) or sorted(
      name for name, flag in flags.FLAGS.__flags.items() if flag.module_name == __name__)
  lines = [f'usage: moetrain {command} [--FLAG=VALUE ...]', '', f'  {COMMANDS[head]}', '']
  for name in names:
    flag = flags.FLAGS[name]
    unset = flag.default is None or flag.default is False or flag.default == []
    default = '' if unset else f' (default {flag.default})'
    lines.append(f'  --{name:<21} {flag.help}{default}')
  if 'config' in names:
    lines.append(f'  --config.KEY=VALUE{"":<5} override any key of the config file, e.g. '
                 '--config.train.steps=100 (every key: moetrain/config.py default_config())')
  if command in RUN_COMMANDS:
    lines.append(f'  --config.KEY=VALUE{"":<5} override a key of the run\'s config.json, e.g. '
                 '--config.data.source=files --config.data.paths=PATH')
  if 'config' in names or command in RUN_COMMANDS:
    lines += ['', 'config keys that take one of a fixed set of values:']
    lines += [f'  {key:<25} {" | ".join(values)}' for key, values in config_lib.CHOICES.items()]
  return '\n'.join(lines)


def _unknown_command(name: str) -> str:
  close = difflib.get_close_matches(name, list(COMMANDS), n=1)
  hint = f"did you mean '{close[0]}'? " if close else ''
  return (f"moetrain: unknown command '{name}'; {hint}the commands are "
          f"{', '.join(COMMANDS)} (`moetrain --help` says what each does).")


def _check_args(argv):
  """A config file that is missing or fails to load (syntax error, an exception, no
  get_config) or an unknown `--config.KEY=` override: one sentence instead of absl's
  traceback."""
  for arg in argv:
    if arg.startswith('--config='):
      value = arg.split('=', 1)[1]
      path, _, config_arg = (value, '', '') if pathlib.Path(value).is_file() else \
          value.partition(':')
      if not pathlib.Path(path).is_file():
        raise config_lib.ConfigError(f'config file {path!r} does not exist; pass '
                                     '--config=PATH to a file such as configs/tiny.py.')
      config_lib.load(path, *([config_arg] if config_arg else []))
    if arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=', 1)[0]
      config_lib.check_key(key)


def _split_overrides(argv: list[str], command: str) -> list[str]:
  """Moves the `--config.KEY=VALUE` arguments of a run command to _OVERRIDES; returns the
  others. A config file does not apply to a trained run."""
  if any(a == '--config' or a.startswith('--config=') for a in argv):
    raise config_lib.ConfigError(f'{command} reads the run\'s config.json; drop --config=FILE '
                                 'and override keys with --config.KEY=VALUE.')
  _OVERRIDES[:] = [a for a in argv if a.startswith('--config.')]
  return [a for a in argv if not a.startswith('--config.')]


def _saved_config_args(command: str, argv: list[str]) -> list[str]:
  """`train --workdir=RUN` without --config: the config RUN saved (RUN/config.json), so an
  imported or earlier run continues with one argument."""
  if command != 'train' or any(a == '--config' or a.startswith('--config=') for a in argv):
    return argv
  from moetrain import paths
  workdirs = [a.split('=', 1)[1] for a in argv if a.startswith('--workdir=')]
  saved = paths.path(workdirs[-1]) / 'config.json' if workdirs else None
  if saved is None or not paths.is_file(saved):
    return argv
  from moetrain import saved_config
  return argv[:1] + [f'--config={saved_config.__file__}:{saved}'] + argv[1:]


def main(argv=None):
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2:
    print(_usage(), file=sys.stderr)
    sys.exit(2)
  if argv[1] in HELP_ARGS + ('help',):
    topic = argv[2] if len(argv) > 2 and argv[1] == 'help' else None
    if topic and topic not in COMMANDS:
      print(_unknown_command(topic), file=sys.stderr)
      sys.exit(2)
    print(_command_help(topic) if topic in COMMAND_FLAGS else _usage())
    sys.exit(0)
  if argv[1] not in COMMANDS:
    print(_unknown_command(argv[1]), file=sys.stderr)
    sys.exit(2)
  command = argv.pop(1)
  if command in SUBCOMMANDS:
    if len(argv) < 2 or argv[1] not in SUBCOMMANDS[command]:
      stream, code = (sys.stdout, 0) if any(a in HELP_ARGS for a in argv) else (sys.stderr, 2)
      print(f'usage: moetrain {command} {"|".join(SUBCOMMANDS[command])} ...\n\n'
            f'  {command:<9} {COMMANDS[command]}', file=stream)
      sys.exit(code)
    command = f'{command} {argv.pop(1)}'
  if any(a in HELP_ARGS for a in argv[1:]):
    print(_command_help(command))
    sys.exit(0)
  try:
    _check_args(argv)
    argv = _saved_config_args(command, argv)
    if command in RUN_COMMANDS:
      argv = _split_overrides(argv, command)
    args = flags.FLAGS(argv)
    if _CONFIG.value is None and command not in ('report', 'export', 'import', *RUN_COMMANDS):
      raise config_lib.ConfigError('--config is required; pass e.g. --config=configs/tiny.py.')
    if _CONFIG.value is not None:
      config_lib.migrate(_CONFIG.value)
    RUNNERS[command](args)
  except (config_lib.ConfigError, flags.Error) as e:
    print(f'moetrain: {e}', file=sys.stderr)
    _exit(2)
  except KeyboardInterrupt:  # a second SIGTERM/SIGINT while the first one's save ran.
    print('moetrain: stopped at once by a second signal; checkpoints committed before are '
          'intact.', file=sys.stderr)
    _exit(130)
  except Exception as e:  # noqa: BLE001 -- re-raised unless it is a one-sentence error.
    if not isinstance(e, _runtime_errors()):
      if not _multi_process():
        raise
      if type(e).__name__ == 'JaxRuntimeError':
        _distributed().give_the_watch_time()  # a dead peer ends this process, naming it.
      traceback.print_exc()
      _exit(1)
    print(f'moetrain: {e}', file=sys.stderr)
    _exit(1)


def _distributed():
  from moetrain.parallel import distributed
  return distributed


def _multi_process() -> bool:
  return 'moetrain.parallel.distributed' in sys.modules and _distributed().WATCH is not None


def _exit(code: int):
  """sys.exit, or in a multi-process run an exit that skips jax.distributed's exit barrier
  (the other processes may be dead, or still running)."""
  if _multi_process():
    _distributed().exit_now(code)
  sys.exit(code)


if __name__ == '__main__':
  main()
