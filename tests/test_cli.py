"""The `moetrain` command: every shipped router family trains from its config file, and
bad input stops it with one sentence before anything compiles."""

import os
import pathlib
import subprocess
import sys

import pytest

from moetrain import metrics as metrics_lib

ROOT = pathlib.Path(__file__).parents[1]
TINY = ['--config.model.d_model=32', '--config.model.num_layers=2',
        '--config.model.num_heads=4', '--config.model.num_kv_heads=2',
        '--config.model.d_ff=64', '--config.data.seq_len=32', '--config.data.batch_size=8',
        '--config.data.max_documents=40', '--config.data.eval_fraction=0.25',
        '--config.train.steps=3', '--config.train.warmup_steps=1',
        '--config.train.log_every=1', '--config.train.eval_every=3',
        '--config.train.eval_batches=1', '--config.train.progress=False',
        '--config.mesh.expert=2']


def moetrain(*args, devices=2, timeout=600):
  env = dict(os.environ, PYTHONPATH=str(ROOT),
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} '
                       '--xla_backend_optimization_level=0')
  return subprocess.run([sys.executable, '-m', 'moetrain.cli', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize('name,extra', [
    ('switch', []), ('gshard', []), ('mixtral_style', []),
    ('deepseek_style', ['--config.model.moe.d_expert=16']), ('expert_choice', []),
    ('dense', ['--config.mesh.expert=1']),
])
def test_config_family_trains(name, extra, tmp_path):
  out = moetrain('train', f'--config=configs/{name}.py', f'--workdir={tmp_path}', *TINY,
                 *extra)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'final eval loss' in out.stdout and 'unigram entropy' in out.stdout
  records = [r for r in metrics_lib.read_jsonl(tmp_path / 'metrics.jsonl') if 'loss' in r]
  assert [r['step'] for r in records] == [1, 2, 3]
  if name != 'dense':
    assert 'moe/layer1/load_max_over_mean' in records[-1]
  if name == 'deepseek_style':
    assert 'moe/layer0/load_max_over_mean' not in records[-1]  # first_k_dense=1
    assert 'moe/layer1/bias_norm' in records[-1]


def test_params_prints_mixtral_sizes():
  out = moetrain('params', '--config=configs/mixtral_8x7b.py')
  assert out.returncode == 0, out.stderr
  assert '(46.703B)' in out.stdout and '(12.880B)' in out.stdout


@pytest.mark.parametrize('args,message', [
    (['--config=configs/tiny.py', '--config.model.moe.top_k=9'],
     'model.moe.top_k=9 is larger than model.num_experts=8'),
    (['--config=configs/tiny.py', '--config.model.num_expert=4'],
     "unknown config key 'model.num_expert'; did you mean 'model.num_experts'?"),
    (['--config=configs/nope.py'], "config file 'configs/nope.py' does not exist"),
    (['--config=configs/tiny.py', '--config.model.num_heads=3'],
     'model.num_heads=3 does not divide model.d_model=128'),
    (['--config=configs/tiny.py'], '--workdir is required'),
])
def test_bad_input_is_one_sentence(args, message, tmp_path):
  workdir = [] if 'workdir' in message else [f'--workdir={tmp_path}']
  out = moetrain('train', *args, *workdir)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], out.stderr


@pytest.mark.parametrize('args,message', [
    (['sample', '--prompt=x'], '--workdir is required for sample'),
    (['sample', '--workdir=WORKDIR'], 'sample needs --prompt=TEXT'),
    (['sample', '--workdir=WORKDIR', '--prompt=x'], 'has no config.json'),
    (['sample', '--workdir=WORKDIR', '--prompt=x', '--top_p=2'], '--top_p=2.0 must lie in'),
    (['sample', '--workdir=WORKDIR', '--prompts_file=nope.txt'], '--prompts_file=nope.txt'),
    (['eval', '--eval_batches=2'], '--workdir is required for eval'),
    (['eval', '--workdir=WORKDIR'], 'has no config.json'),
    (['eval', '--workdir=WORKDIR', '--config=configs/tiny.py'], "eval reads the run's config"),
    (['eval', '--workdir=WORKDIR', '--config.data.sorce=files'],
     "unknown config key 'data.sorce'; did you mean 'data.source'?"),
    (['report', '--workdir=WORKDIR'], 'holds no finished runs'),
    (['sweep', '--config=configs/tiny.py', '--workdir=WORKDIR'], 'at least one --sweep'),
    (['export', '--workdir=WORKDIR'], 'export needs --output=DIR'),
    (['import', '--workdir=WORKDIR', '--from=WORKDIR'], 'has no config.json'),
])
def test_other_commands_bad_input(args, message, tmp_path):
  out = moetrain(*[a.replace('WORKDIR', str(tmp_path)) for a in args])
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], out.stderr


def test_usage_without_command():
  out = moetrain()
  assert out.returncode == 2 and 'usage: moetrain' in out.stderr


def test_eval_and_sample_commands(trained_run, tmp_path):
  """On 2 devices (the run trained on 8): eval with a typed override, and a batch of
  prompts from flags and a file whose draws are the library's with the same --seed."""
  from moetrain import evaluate
  from moetrain import sample
  out = moetrain('eval', f'--workdir={trained_run}', '--eval_batches=1',
                 '--config.model.moe.eval_capacity_factor=4.0')
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  _, totals = evaluate.evaluate_workdir(
      trained_run, {'model.moe.eval_capacity_factor': 4.0}, num_batches=1)
  assert 'at step 3, eval split of data.source=stdlib' in lines[0]
  assert lines[1].startswith('loss ') and lines[3].startswith('bits per byte ')
  assert float(lines[1].split()[1]) == pytest.approx(totals.loss, abs=2e-4)
  assert float(lines[3].split()[-1]) == pytest.approx(totals.bits_per_byte, abs=2e-4)
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('import os\\nimport sys\n\nclass A:\n')
  out = moetrain('sample', f'--workdir={trained_run}', '--prompt=def ',
                 f'--prompts_file={prompts}', '--max_new_tokens=4', '--temperature=0.9',
                 '--top_k=5', '--top_p=0.9', '--seed=1')
  assert out.returncode == 0, out.stderr[-3000:]
  texts = ['def ', 'import os\nimport sys', 'class A:']
  draws = lambda seed: sample.sample(trained_run, texts, max_new_tokens=4, seed=seed,
                                     sampler=sample.Sampler(0.9, top_k=5, top_p=0.9))
  seeded = draws(1)
  assert seeded != draws(2)
  assert out.stdout == ''.join(f'--- sample {i + 1} of 3 ---\n{prompt}{text}\n'
                               for i, (prompt, text) in enumerate(zip(texts, seeded)))


def in_process(capsys, *args):
  """cli.main in this process: (exit code, stdout, stderr)."""
  from moetrain import cli
  with pytest.raises(SystemExit) as e:
    cli.main(['moetrain', *args])
  out = capsys.readouterr()
  return e.value.code, out.out, out.err


def every_command():
  from moetrain import cli
  return [f'{c} {sub}' for c in cli.COMMANDS for sub in cli.SUBCOMMANDS.get(c, ())] + [
      c for c in cli.COMMANDS if c not in cli.SUBCOMMANDS]


@pytest.mark.parametrize('command', every_command())
def test_help_on_every_command(command, capsys):
  from moetrain import cli
  for flag in ('--help', '-h'):
    code, out, err = in_process(capsys, *command.split(), flag)
    assert code == 0 and not err, err
    assert out.startswith(f'usage: moetrain {command} ')
    for name in cli.COMMAND_FLAGS.get(command, ()):
      assert f'--{name} ' in out, name
  code, out, _ = in_process(capsys, 'help', command.split()[0])
  assert code == 0 and out.startswith('usage: moetrain')


def test_top_level_help_and_unknown_command(capsys):
  code, out, _ = in_process(capsys, '--help')
  assert code == 0 and 'usage: moetrain COMMAND' in out and 'sweep' in out
  code, out, err = in_process(capsys, 'trian', '--config=configs/tiny.py')
  assert code == 2 and not out
  assert err.strip().splitlines() == [err.strip()]
  assert err.startswith("moetrain: unknown command 'trian'; did you mean 'train'?")


@pytest.mark.parametrize('text,message', [
    ('def get_config(:\n  pass\n', r"config file '.*bad\.py' line 1: invalid syntax"),
    ('x = 1\n', r'has no get_config\(\)'),
    ('import os\n\ndef get_config():\n  return {}["model"]\n',
     r"line 4 raised KeyError: 'model' in get_config\(\)"),
    ('raise RuntimeError("no config today")\n',
     r'line 1 raised RuntimeError: no config today in running it'),
    ('def get_config():\n  return 5\n', r'get_config\(\) returned an object of type int, not a ConfigDict'),
])
def test_bad_config_file_is_one_sentence_with_its_line(text, message, tmp_path, capsys):
  import re
  path = tmp_path / 'bad.py'
  path.write_text(text)
  code, out, err = in_process(capsys, 'train', f'--config={path}', f'--workdir={tmp_path}')
  assert code == 2 and not out
  lines = err.strip().splitlines()
  assert len(lines) == 1 and re.search(message, lines[0]), err


def test_readme_bench_commands_run_as_written():
  """`python bench/run.py` etc. as the README writes them, from the repo root without
  PYTHONPATH (bench/ is not an installed package)."""
  import re
  scripts = sorted(set(re.findall(r'`python (bench/\w+\.py)', (ROOT / 'README.md').read_text())))
  assert 'bench/run.py' in scripts
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  for script in scripts:
    out = subprocess.run([sys.executable, script, '--help'], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith('usage:'), (script, out.stderr)
