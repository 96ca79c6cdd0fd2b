"""Hugging Face export and import: transformers (torch on CPU) computes the logits moetrain
computes for every exported family; export -> import -> export reproduces the files and the
parameters; checkpoints written by transformers' save_pretrained import exactly; models no
HF class holds are refused with one sentence."""

import filecmp
import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from moetrain import checkpoint as checkpoint_lib
from moetrain import config as config_lib
from moetrain import data as data_lib
from moetrain.interop import hf, hf_config
from moetrain.interop import params as params_lib
from moetrain.model.transformer import Transformer

from conftest import model_logits, seed_of, tiny_config
from test_cli import moetrain

EXACT = {'model.moe.dropless': True, 'model.vocab_size': 0}
FAMILIES = {
    'mixtral': {'model.moe.softmax_order': 'topk_softmax', 'model.tie_embeddings': False},
    'qwen3_moe': {'model.qk_norm': True, 'model.moe.renormalize': True, 'model.num_layers': 3,
                  'model.first_k_dense': 1, 'model.moe.d_expert': 16, 'model.head_dim': 16},
    'qwen2_moe': {'model.moe.num_shared_experts': 2, 'model.moe.shared_expert_gate': True,
                  'model.qkv_bias': True, 'model.moe_every': 2,
                  'model.tie_embeddings': False},
    'llama': {'model.num_experts': 0, 'model.tie_embeddings': False},
}
SHARD_BYTES = {'qwen2_moe': 40_000}  # several safetensors files and an index.


def family_config(family, root):
  """The resolved config of `family`'s test model; llama's trains and uses a BPE tokenizer
  (saved in root), so that export writes tokenizer files."""
  cfg = config_lib.validate(tiny_config(**EXACT, **FAMILIES[family]))
  if family == 'llama':
    data_lib.train_tokenizer(cfg, 320, str(root / 'bpe.json'))
    cfg.data.tokenizer = str(root / 'bpe.json')
  return data_lib.resolve_vocab(cfg)


def random_params(rng, cfg) -> dict:
  """Fresh random values for every parameter (norm scales around 1, biases nonzero)."""
  model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
  out = {}
  for key, shape in params_lib.shapes(nnx.state(model, nnx.Param)).items():
    if key.endswith('scale'):
      value = 1.0 + 0.2 * rng.standard_normal(shape)
    elif key == 'embed' or '.b_' in key:
      value = rng.standard_normal(shape) * (1.0 if key == 'embed' else 0.2)
    else:
      fan_in = shape[-2] if key.endswith('w_down') else cfg.model.d_model
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    out[key] = value.astype(np.float32)
  return out


def hf_logits(directory, ids):
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  model.eval()
  with torch.no_grad():
    return type(model).__name__, model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


_EXPORTS = {}


def export_family(family, tmp_path_factory):
  """(family, cfg, params, root) of a tiny random model of `family` (its parameters drawn
  from a seed of the family's name), saved as a run in root/run and exported to root/hf
  (once per module)."""
  if family not in _EXPORTS:
    root = tmp_path_factory.mktemp(family)
    cfg = family_config(family, root)
    params = random_params(np.random.default_rng(seed_of(f'export_family[{family}]')), cfg)
    hf.save_run(cfg, params, root / 'run')
    hf.export(root / 'run', root / 'hf', max_shard_bytes=SHARD_BYTES.get(family, 2**30),
              log=lambda *a: None)
    _EXPORTS[family] = family, cfg, params, root
  return _EXPORTS[family]


@pytest.fixture(scope='module', params=list(FAMILIES))
def exported(request, tmp_path_factory):
  return export_family(request.param, tmp_path_factory)


def test_transformers_logits_equal_moetrain(exported, rng):
  family, cfg, params, root = exported
  ids = rng.integers(0, cfg.model.vocab_size, (3, 24))
  name, theirs = hf_logits(root / 'hf', ids)
  assert name == hf_config.ARCHITECTURES[family]
  ours = model_logits(cfg, params, ids)
  assert np.abs(ours).max() > 0.1  # the comparison is not between near-zero outputs.
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)
  written = sorted(p.name for p in (root / 'hf').iterdir())
  if family in SHARD_BYTES:
    assert hf.INDEX in written and len([n for n in written if n.endswith('.safetensors')]) > 1
  elif family == 'llama':
    assert written == ['config.json', 'model.safetensors', 'tokenizer.json',
                       'tokenizer_config.json']
  else:
    assert written == ['config.json', 'model.safetensors']


def test_tokenizer_travels_with_the_model(tmp_path_factory):
  _, cfg, _, root = export_family('llama', tmp_path_factory)
  ours = data_lib.make_tokenizer(cfg.data)
  theirs = transformers.AutoTokenizer.from_pretrained(root / 'hf')
  text = 'def read_config(path):\n  return open(path).read()'
  assert theirs(text, add_special_tokens=False)['input_ids'] == ours.encode(text).tolist()
  assert theirs.eos_token_id == ours.eod_id
  assert json.loads((root / 'hf' / 'config.json').read_text())['eos_token_id'] == ours.eod_id


def test_export_import_export_reproduces_files_and_logits(exported, rng):
  family, cfg, params, root = exported
  imported = hf.import_model(root / 'hf', root / 'imported', tiny_config(),
                             log=lambda *a: None)
  step, back = params_lib.newest_params(root / 'imported')
  assert step == 0 and set(back) == set(params)
  for key in params:
    np.testing.assert_array_equal(back[key], params[key], err_msg=key)
  ids = rng.integers(0, cfg.model.vocab_size, (2, 16))
  np.testing.assert_array_equal(model_logits(imported, back, ids),
                                model_logits(cfg, params, ids))
  hf.export(root / 'imported', root / 'again', max_shard_bytes=SHARD_BYTES.get(family, 2**30),
            log=lambda *a: None)
  first, again = sorted(p.name for p in (root / 'hf').iterdir()), \
      sorted(p.name for p in (root / 'again').iterdir())
  assert first == again
  match, mismatch, errors = filecmp.cmpfiles(root / 'hf', root / 'again', first, shallow=False)
  assert mismatch == [] and errors == [] and match == first


def test_a_scanned_run_exports_the_files_of_the_unscanned_run(tmp_path_factory, tmp_path):
  """qwen3_moe's test model has a dense layer, then MoE layers: two scanned runs."""
  family, cfg, params, root = export_family('qwen3_moe', tmp_path_factory)
  scanned = cfg.copy_and_resolve_references()
  scanned.model.scan_layers = True
  hf.save_run(scanned, params, tmp_path / 'run')
  stored = checkpoint_lib.Checkpointer(tmp_path / 'run')
  try:
    keys = stored.read_arrays(0)
  finally:
    stored.manager.close()
  assert any(k.startswith('params.runs.1.units.0.ffn.w_gate') for k in keys)
  assert not any(k.startswith('params.blocks.') for k in keys)
  step, back = params_lib.newest_params(tmp_path / 'run')
  assert set(back) == set(params)
  for key in params:
    np.testing.assert_array_equal(back[key], params[key], err_msg=key)
  hf.export(tmp_path / 'run', tmp_path / 'hf', log=lambda *a: None)
  names = sorted(p.name for p in (root / 'hf').iterdir())
  assert sorted(p.name for p in (tmp_path / 'hf').iterdir()) == names
  match, mismatch, errors = filecmp.cmpfiles(root / 'hf', tmp_path / 'hf', names, shallow=False)
  assert mismatch == [] and errors == [] and match == names


def test_imported_run_trains_with_one_argument(tmp_path_factory, tmp_path):
  _, _, _, root = export_family('mixtral', tmp_path_factory)
  hf.import_model(root / 'hf', tmp_path / 'run', tiny_config(**{'train.log_every': 1}),
                  log=lambda *a: None)
  out = moetrain('train', f'--workdir={tmp_path / "run"}', '--config.train.steps=2',
                 '--config.train.warmup_steps=1', '--config.train.eval_every=2',
                 '--config.mesh.expert=2')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'resuming from the checkpoint at step 0' in out.stdout
  assert 'final eval loss' in out.stdout
  records = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').open()
             if '"loss"' in line]
  assert [r['step'] for r in records] == [1, 2] and all(np.isfinite(r['loss']) for r in records)


def random_hf_model(rng, config):
  """A transformers model of `config` with fresh random weights of a useful size (its own
  init is too small to tell layouts apart)."""
  torch.manual_seed(int(rng.integers(2**31)))
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight'):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif name.endswith('bias'):
        p.copy_(0.2 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / (1.0 if 'embed' in name else p.shape[-1] ** 0.5))
  return model.eval()


@pytest.mark.parametrize('family', ['qwen2_moe', 'mistral'])
def test_import_reads_what_transformers_saves(family, tmp_path, rng):
  shape = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
  if family == 'qwen2_moe':  # biases, MoE in every second layer, two experts' width shared.
    config = transformers.Qwen2MoeConfig(
        **shape, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, decoder_sparse_step=2, qkv_bias=True,
        rope_parameters=dict(rope_type='default', rope_theta=5e4))
  else:
    config = transformers.MistralConfig(**shape, sliding_window=None, tie_word_embeddings=True)
  random_hf_model(rng, config).save_pretrained(tmp_path / 'hf')
  cfg = hf.import_model(tmp_path / 'hf', tmp_path / 'run', tiny_config(), log=lambda *a: None)
  if family == 'qwen2_moe':
    m = cfg.model
    assert (m.num_experts, m.first_k_dense, m.moe_every, m.qkv_bias) == (4, 0, 2, True)
    assert (m.moe.d_expert, m.moe.num_shared_experts, m.moe.shared_expert_gate) == (16, 2, True)
  else:
    assert cfg.model.num_experts == 0 and cfg.model.tie_embeddings
  ids = rng.integers(0, 300, (2, 20))
  name, theirs = hf_logits(tmp_path / 'hf', ids)
  ours = model_logits(cfg, params_lib.newest_params(tmp_path / 'run')[1], ids)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
  # Exported again: the same class and the very tensors transformers saved.
  hf.export(tmp_path / 'run', tmp_path / 'out', log=lambda *a: None)
  assert hf_logits(tmp_path / 'out', ids)[0] == name
  saved, again = hf.load_safetensors(tmp_path / 'hf'), hf.load_safetensors(tmp_path / 'out')
  assert set(saved) == set(again)
  for key in saved:
    np.testing.assert_array_equal(again[key], saved[key], err_msg=key)


def test_models_no_class_holds_are_refused_in_one_sentence(tmp_path_factory, tmp_path):
  sigmoid = tiny_config(**{'model.moe.gate': 'sigmoid', 'model.moe.renormalize': True})
  refuse, _ = hf_config.export_problems(sigmoid.model, hf_config.choose_family(sigmoid.model))
  assert 'multi-head latent attention' in refuse[0]
  with pytest.raises(hf_config.ImportRefused, match='multi-head latent attention'):
    hf_config.from_hf_config({'model_type': 'deepseek_v3'}, tiny_config())
  for overrides, family, message in [
      ({'model.qk_norm': False}, 'qwen3_moe', 'set model.qk_norm=True'),
      ({'model.moe.num_shared_experts': 1}, 'mixtral', 'export with --format=qwen2_moe'),
      ({'model.moe.num_shared_experts': 1}, 'qwen2_moe', 'set model.moe.shared_expert_gate'),
      ({'model.first_k_dense': 1}, 'mixtral', 'Mixtral has a MoE in every layer'),
      ({'model.num_experts': 0}, 'mixtral', 'use --format=auto')]:
    refuse, _ = hf_config.export_problems(tiny_config(**EXACT, **overrides).model, family)
    assert refuse and message in refuse[0], (overrides, refuse)
  # A capacity that drops at eval: refused, or written with --inexact and a warning.
  _, cfg, _, root = export_family('mixtral', tmp_path_factory)
  run = tmp_path / 'capacity'
  shutil.copytree(root / 'run', run)
  saved = json.loads((run / 'config.json').read_text())
  saved['model']['moe'].update(dropless=False, eval_capacity_factor=1.0)
  (run / 'config.json').write_text(json.dumps(saved))
  with pytest.raises(config_lib.ConfigError, match='drops assignments.*pass --inexact') as info:
    hf.export(run, tmp_path / 'out')
  assert '\n' not in str(info.value) and not (tmp_path / 'out').exists()
  lines = []
  hf.export(run, tmp_path / 'out', inexact=True, log=lines.append)
  assert lines[0].startswith('warning: transformers outputs will differ') and 'drops' in lines[0]
  with pytest.raises(config_lib.ConfigError, match='exists and is not empty'):
    hf.export(run, tmp_path / 'out', inexact=True)
  with pytest.raises(config_lib.ConfigError, match='already holds a run'):
    hf.import_model(root / 'hf', run)
