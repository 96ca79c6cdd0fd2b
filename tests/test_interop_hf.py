"""Hugging Face export and import: transformers (torch on CPU) computes the logits moetrain
computes for every exported family; export -> import -> export reproduces the files and the
parameters; checkpoints written by transformers' save_pretrained import exactly; models no
HF class holds are refused with one sentence."""

import filecmp
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from moetrain import config as config_lib
from moetrain import data as data_lib
from moetrain.interop import hf, hf_config, hf_weights
from moetrain.interop import params as params_lib
from moetrain.model.transformer import Transformer

from conftest import tiny_config
from test_cli import moetrain

RNG = np.random.default_rng()
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


def family_config(family):
  return data_lib.resolve_vocab(config_lib.validate(tiny_config(**EXACT, **FAMILIES[family])))


def random_params(cfg) -> dict:
  """Fresh random values for every parameter (norm scales around 1, biases nonzero)."""
  model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
  out = {}
  for key, shape in params_lib.shapes(nnx.state(model, nnx.Param)).items():
    if key.endswith('scale'):
      value = 1.0 + 0.2 * RNG.standard_normal(shape)
    elif key == 'embed' or '.b_' in key:
      value = RNG.standard_normal(shape) * (1.0 if key == 'embed' else 0.2)
    else:
      fan_in = shape[-2] if key.endswith('w_down') else cfg.model.d_model
      value = RNG.standard_normal(shape) / np.sqrt(fan_in)
    out[key] = value.astype(np.float32)
  return out


def moetrain_logits(cfg, params, ids):
  """float32 [B, L, V] of the moetrain model with these parameters."""
  model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
  graphdef, abstract, rest = nnx.split(model, nnx.Param, ...)
  model = nnx.merge(graphdef, params_lib.from_flat(abstract, params), rest)
  return np.asarray(model(jnp.asarray(ids, jnp.int32), train=False)[0])


def hf_logits(directory, ids):
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  model.eval()
  with torch.no_grad():
    return type(model).__name__, model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


_EXPORTS = {}


def export_family(family, tmp_path_factory):
  """(family, cfg, params, root) of a tiny random model of `family`, saved as a run in
  root/run and exported to root/hf (once per module)."""
  if family not in _EXPORTS:
    root = tmp_path_factory.mktemp(family)
    cfg = family_config(family)
    params = random_params(cfg)
    hf.save_run(cfg, params, root / 'run')
    hf.export(root / 'run', root / 'hf', max_shard_bytes=SHARD_BYTES.get(family, 2**30),
              log=lambda *a: None)
    _EXPORTS[family] = family, cfg, params, root
  return _EXPORTS[family]


@pytest.fixture(scope='module', params=list(FAMILIES))
def exported(request, tmp_path_factory):
  return export_family(request.param, tmp_path_factory)


def test_transformers_logits_equal_moetrain(exported):
  family, cfg, params, root = exported
  ids = RNG.integers(0, cfg.model.vocab_size, (3, 24))
  name, theirs = hf_logits(root / 'hf', ids)
  assert name == hf_config.ARCHITECTURES[family]
  ours = moetrain_logits(cfg, params, ids)
  assert np.abs(ours).max() > 0.1  # the comparison is not between near-zero outputs.
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)
  written = sorted(p.name for p in (root / 'hf').iterdir())
  if family in SHARD_BYTES:
    assert hf.INDEX in written and len([n for n in written if n.endswith('.safetensors')]) > 1
  else:
    assert written == ['config.json', 'model.safetensors']


def test_export_import_export_reproduces_files_and_logits(exported):
  family, cfg, params, root = exported
  imported = hf.import_model(root / 'hf', root / 'imported', tiny_config(),
                             log=lambda *a: None)
  step, back = params_lib.newest_params(root / 'imported')
  assert step == 0 and set(back) == set(params)
  for key in params:
    np.testing.assert_array_equal(back[key], params[key], err_msg=key)
  ids = RNG.integers(0, cfg.model.vocab_size, (2, 16))
  np.testing.assert_array_equal(moetrain_logits(imported, back, ids),
                                moetrain_logits(cfg, params, ids))
  hf.export(root / 'imported', root / 'again', max_shard_bytes=SHARD_BYTES.get(family, 2**30),
            log=lambda *a: None)
  first, again = sorted(p.name for p in (root / 'hf').iterdir()), \
      sorted(p.name for p in (root / 'again').iterdir())
  assert first == again
  match, mismatch, errors = filecmp.cmpfiles(root / 'hf', root / 'again', first, shallow=False)
  assert mismatch == [] and errors == [] and match == first


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
