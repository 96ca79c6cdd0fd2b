"""`moetrain export` and `moetrain import`: a run as a Hugging Face model directory
(safetensors + config.json + tokenizer) that `transformers.AutoModelForCausalLM` loads, and
a HF directory as a moetrain run at step 0 that `moetrain train` continues.

The family (`hf_config`) and the tensor layout (`hf_weights`) live beside this file; this
module reads and writes files. Nothing is overwritten: export writes into a new directory
(renamed into place when complete), import into a workdir that holds no run yet. Import
keeps the source's config.json and tokenizer files in WORKDIR/hf/, and export starts from
them, so export -> import -> export reproduces the files byte for byte.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import jax
import numpy as np

from moetrain import checkpoint as checkpoint_lib
from moetrain import config as config_lib
from moetrain import data as data_lib
from moetrain import optimizer as optimizer_lib
from moetrain import paths
from moetrain import state as state_lib
from moetrain.interop import hf_config, hf_weights
from moetrain.interop import params as params_lib
from moetrain.parallel import mesh as mesh_lib

WEIGHTS = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
MAX_SHARD_BYTES = 5 * 2**30
SIDE_SUFFIXES = ('.json', '.model', '.txt', '.jinja', '.tiktoken')  # tokenizer and friends
SOURCE = 'hf'  # WORKDIR/hf/: the files an imported run came with.


def write_json(path: pathlib.Path, obj):
  """JSON with sorted keys and a final newline: the same object gives the same bytes."""
  path.write_text(json.dumps(obj, indent=2, sort_keys=True) + '\n')


def shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
  """Consecutive groups of tensors of at most `max_bytes` each (a bigger tensor alone)."""
  out, size = [{}], 0
  for name, array in tensors.items():
    if out[-1] and size + array.nbytes > max_bytes:
      out.append({})
      size = 0
    out[-1][name] = array
    size += array.nbytes
  return out


def save_safetensors(tensors: dict[str, np.ndarray], directory: pathlib.Path,
                     max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
  """Writes model.safetensors, or numbered shards plus model.safetensors.index.json as
  transformers does; returns the file names."""
  from safetensors.numpy import save_file
  groups = shards(tensors, max_shard_bytes)
  names = [WEIGHTS] if len(groups) == 1 else [
      f'model-{i + 1:05d}-of-{len(groups):05d}.safetensors' for i in range(len(groups))]
  umask = os.umask(0)
  os.umask(umask)
  for name, group in zip(names, groups):
    save_file(group, str(directory / name), metadata={'format': 'pt'})
    os.chmod(directory / name, 0o666 & ~umask)  # safetensors creates files owner-only.
  if len(groups) == 1:
    return names
  write_json(directory / INDEX, dict(
      metadata=dict(total_size=sum(a.nbytes for a in tensors.values())),
      weight_map={k: name for name, group in zip(names, groups) for k in group}))
  return names + [INDEX]


def load_safetensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of a HF model directory (single file or sharded), as NumPy arrays."""
  from safetensors.numpy import load_file
  if (directory / INDEX).is_file():
    files = sorted(set(json.loads((directory / INDEX).read_text())['weight_map'].values()))
  elif (directory / WEIGHTS).is_file():
    files = [WEIGHTS]
  else:
    raise config_lib.ConfigError(
        f'{directory} has no {WEIGHTS} or {INDEX}; save the model with transformers\' '
        'save_pretrained(safe_serialization=True) first.')
  tensors = {}
  for name in files:
    tensors.update(load_file(str(directory / name)))
  return tensors


def _local_only(path, flag: str, fix: str):
  """Raises ConfigError when `path` (given by `flag`) is in a bucket."""
  if paths.is_cloud(path):
    raise config_lib.ConfigError(f'{flag}={path} is in a bucket, and Hugging Face model '
                                 f'directories are local here; {fix}.')


def _side_files(directory) -> list:
  """Tokenizer and generation files of a HF directory (not config.json, not weights;
  local, or a gs:// workdir's hf/)."""
  if not directory.is_dir():
    return []
  return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in SIDE_SUFFIXES
                and p.name not in ('config.json', INDEX))


def _tokenizer_config(tokenizer, seq_len: int) -> dict:
  """tokenizer_config.json for a tokenizers .json file: AutoTokenizer loads it as a fast
  tokenizer whose eos token is the run's end-of-document token."""
  out = dict(tokenizer_class='PreTrainedTokenizerFast', model_max_length=seq_len)
  token = tokenizer.tokenizer.id_to_token(tokenizer.eod_id)
  if token is not None:
    out['eos_token'] = token
  return out


def _new_directory(path: pathlib.Path, what: str) -> pathlib.Path:
  """A fresh temporary sibling of `path` to fill and rename; refuses a non-empty `path`."""
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise config_lib.ConfigError(f'{what}={path} exists and is not empty; choose a new '
                                 'directory (nothing is ever overwritten).')
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'.{path.name}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  return tmp


def export(workdir, output, *, fmt: str = 'auto', inexact: bool = False,
           max_shard_bytes: int = MAX_SHARD_BYTES, log=print) -> pathlib.Path:
  """Writes the newest checkpoint of `workdir` as a HF model directory `output`.

  fmt: 'auto' (from the config, see hf_config.choose_family) or a family name. A model the
  family cannot hold is refused (ConfigError); one whose transformers outputs would differ
  is refused unless `inexact`, which prints how they differ.
  """
  _local_only(output, '--output', 'export writes a local directory; copy it there afterwards')
  workdir, output = paths.path(workdir), pathlib.Path(output)
  if fmt not in hf_config.FORMATS:
    raise config_lib.ConfigError(f'--format={fmt!r} is not known; use one of '
                                 f'{", ".join(hf_config.FORMATS)}.')
  cfg = params_lib.run_config(workdir)
  source = workdir / SOURCE
  base = json.loads(paths.read_text(source / 'config.json')) \
      if paths.is_file(source / 'config.json') else None
  family = hf_config.choose_family(cfg.model) if fmt == 'auto' else fmt
  if fmt == 'auto' and family in hf_config.DENSE and (base or {}).get('model_type') in \
      hf_config.DENSE:
    family = base['model_type']  # a dense run imported from Mistral goes back as Mistral.
  refuse, differ = hf_config.export_problems(cfg.model, family)
  if refuse:
    raise config_lib.ConfigError(f'cannot export as {family}: {refuse[0]}.')
  if differ and not inexact:
    raise config_lib.ConfigError(f'exporting as {family} would change outputs: {differ[0]}; '
                                 'pass --inexact to export anyway.')
  for line in differ:
    log(f'warning: transformers outputs will differ from moetrain\'s: {line}.')
  step, params = params_lib.newest_params(workdir)
  tensors = hf_weights.to_hf(params, cfg.model, family)
  tokenizer = data_lib.make_tokenizer(cfg.data)
  tmp = _new_directory(output, '--output')
  try:
    for path in _side_files(source):
      (tmp / path.name).write_bytes(paths.read_bytes(path))
    if cfg.data.tokenizer.endswith('.json'):
      shutil.copyfile(cfg.data.tokenizer, tmp / 'tokenizer.json')
      if not (tmp / 'tokenizer_config.json').exists():
        write_json(tmp / 'tokenizer_config.json',
                   _tokenizer_config(tokenizer, cfg.data.seq_len))
    write_json(tmp / 'config.json', hf_config.to_hf_config(
        cfg, family, eos_token_id=tokenizer.eod_id, base=base))
    files = save_safetensors(tensors, tmp, max_shard_bytes)
    if output.exists():
      output.rmdir()
    tmp.rename(output)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed.
  count = sum(int(a.size) for a in tensors.values())
  log(f'exported {workdir} (step {step}) as {family} ({hf_config.ARCHITECTURES[family]}): '
      f'{count:,} parameters in {len(tensors)} tensors, {len(files)} weight file(s) -> '
      f'{output}')
  return output


def import_model(hf_dir, workdir, cfg=None, *, log=print):
  """Reads HF model directory `hf_dir` into a new moetrain run `workdir`: config.json and a
  step-0 checkpoint (fresh optimizer state) that `moetrain train --workdir` continues.

  `cfg` gives everything but the model (data, train, mesh; default_config() if None); the
  model keys come from the HF config.json. Returns the run's config.
  """
  _local_only(hf_dir, '--from', 'copy the model directory to this machine first')
  _local_only(workdir, '--workdir', 'import into a local directory (its config names the '
              'local tokenizer it copies)')
  hf_dir, workdir = pathlib.Path(hf_dir), pathlib.Path(workdir)
  if not (hf_dir / 'config.json').is_file():
    raise config_lib.ConfigError(f'--from={hf_dir} has no config.json; pass a Hugging Face '
                                 'model directory (save_pretrained writes one).')
  if (workdir / 'config.json').exists() or (workdir / 'checkpoints').exists() or (
      workdir / SOURCE).exists():
    raise config_lib.ConfigError(f'--workdir={workdir} already holds a run; import into a '
                                 'new directory (nothing is ever overwritten).')
  hf = json.loads((hf_dir / 'config.json').read_text())
  family, cfg = hf_config.from_hf_config(hf, cfg or config_lib.default_config())
  flat = hf_weights.from_hf(load_safetensors(hf_dir), cfg.model, family)
  if (hf_dir / 'tokenizer.json').is_file():
    cfg.data.tokenizer = str(hf_dir / 'tokenizer.json')
  vocab = data_lib.make_tokenizer(cfg.data).vocab_size
  if vocab > cfg.model.vocab_size:
    raise config_lib.ConfigError(
        f'the model has {cfg.model.vocab_size} token embeddings but data.tokenizer='
        f'{cfg.data.tokenizer!r} has {vocab} tokens; put the model\'s tokenizer.json in '
        '--from, or pass a --config whose data.tokenizer is the model\'s.')
  cfg = data_lib.resolve_vocab(config_lib.validate(cfg))
  source = workdir / SOURCE
  if (hf_dir / 'tokenizer.json').is_file():  # the copy made below, once all is checked.
    cfg.data.tokenizer = str((source / 'tokenizer.json').absolute())
  save_run(cfg, flat, workdir)
  source.mkdir()
  for path in [hf_dir / 'config.json'] + _side_files(hf_dir):
    shutil.copyfile(path, source / path.name)
  count = sum(int(a.size) for a in flat.values())
  log(f'imported {hf_dir} ({hf_config.ARCHITECTURES[family]}) into {workdir}: {count:,} '
      f'parameters at step 0; continue with: moetrain train --workdir={workdir}')
  return cfg


def save_run(cfg, params: dict, workdir) -> pathlib.Path:
  """Writes a run at step 0 with parameters `params` (flat, `moetrain.interop.params`) into
  `workdir`: an orbax checkpoint (fresh optimizer state; no data position, so training
  starts at the beginning of the data) and config.json. `cfg` must be resolved."""
  workdir = pathlib.Path(workdir)
  one = cfg.copy_and_resolve_references()
  one.mesh.data, one.mesh.fsdp, one.mesh.expert = 1, 1, 1
  mesh = mesh_lib.make_mesh(one, devices=jax.devices()[:1])
  tx = optimizer_lib.make_optimizer(cfg.train)
  _, abstract, _ = state_lib.abstract_state(one, mesh, tx)
  _, state, _ = state_lib.state_with_params(
      one, mesh, tx, params_lib.from_flat(abstract.params, params))
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=cfg.checkpoint.keep)
  try:
    checkpointer.save(0, state, dict(config=json.loads(cfg.to_json_best_effort()), data=None),
                      force=True)
  finally:
    checkpointer.close()
  (workdir / 'config.json').write_text(cfg.to_json_best_effort(indent=2))
  return workdir
