"""Config validation: each bad value gives one sentence naming the key and the fix."""

import pathlib
import re
import sys

import pytest

from moetrain import config as config_lib
from moetrain.config import ConfigError

from conftest import tiny_config

CONFIGS = sorted((pathlib.Path(__file__).parents[1] / 'configs').glob('*.py'))


@pytest.mark.parametrize('overrides,message', [
    ({'model.moe.top_k': 5}, r'model\.moe\.top_k=5 is larger than model\.num_experts=4'),
    ({'model.d_model': 0}, r'model\.d_model=0 must be positive'),
    ({'model.num_layers': -1}, r'model\.num_layers=-1 must be positive'),
    ({'model.num_heads': 3}, r'model\.num_heads=3 does not divide model\.d_model=32'),
    ({'model.num_kv_heads': 3}, r'model\.num_kv_heads=3 does not divide model\.num_heads=4'),
    ({'model.num_experts': -2}, r'model\.num_experts=-2 must be non-negative'),
    ({'model.moe.router': 'hash'}, r"model\.moe\.router='hash' is not known"),
    ({'model.moe.gate': 'relu'}, r"model\.moe\.gate='relu' is not known"),
    ({'model.moe.capacity_factor': 0.0}, r'model\.moe\.capacity_factor=0\.0 must be positive'),
    ({'model.moe.jitter': 1.5}, r'model\.moe\.jitter=1\.5 must lie in \[0, 1\)'),
    ({'model.moe.router': 'expert_choice', 'model.moe.dropless': True},
     r'dropless=True needs router=.token_choice.'),
    ({'model.moe.grouped_matmul': 'cublas'}, r"model\.moe\.grouped_matmul='cublas' is not known"),
    ({'model.moe.grouped_matmul': 'tokamax'},
     r"grouped_matmul='tokamax' runs the grouped matmuls of the ragged dropless path, which "
     r"dropless=False, dropless_impl='auto' does not take"),
    ({'model.moe.grouped_matmul': 'tokamax', 'model.moe.dropless': True,
      'model.moe.dropless_impl': 'padded'}, r"dropless=True, dropless_impl='padded' does not"),
    ({'model.moe.gate': 'sigmoid', 'model.moe.softmax_order': 'topk_softmax'},
     r"softmax_order='topk_softmax' needs gate='softmax'"),
    ({'model.first_k_dense': 2}, r'no layer is a MoE layer'),
    ({'model.dtype': 'float16'}, r"model\.dtype='float16' is not supported"),
    ({'data.seq_len': 0}, r'data\.seq_len=0 must be positive'),
    ({'data.eval_fraction': 1.0}, r'data\.eval_fraction=1\.0 must lie in \(0, 1\)'),
    ({'train.lr': 0.0}, r'train\.lr=0\.0 must be positive'),
    ({'train.spike_window': -1}, r'train\.spike_window=-1 must be non-negative'),
    ({'train.spike_loss_factor': 1.0}, r'train\.spike_loss_factor=1\.0 must be a number above 1'),
    ({'train.spike_grad_factor': 0.5}, r'train\.spike_grad_factor=0\.5 must be a number above 1'),
    ({'train.max_bad_in_a_row': 0}, r'train\.max_bad_in_a_row=0 must be positive'),
    ({'checkpoint.restore_step': -3}, r'checkpoint\.restore_step=-3 must be non-negative'),
    ({'mesh.expert': 0}, r'mesh\.expert=0 must be a positive size or -1'),
    ({'model.head_dim': 7}, r'model\.head_dim=7 is odd'),
    ({'model.head_dim': -8}, r'model\.head_dim=-8 must be non-negative'),
    ({'model.num_heads': 3, 'model.head_dim': 0}, r'or set model\.head_dim'),
    ({'model.moe.shared_expert_gate': True}, r'shared_expert_gate=True needs shared experts'),
    ({'init.upcycle': True}, r'init\.upcycle=True needs init\.from_workdir'),
    ({'init.upcycle': True, 'init.from_workdir': 'runs/dense', 'model.num_experts': 0},
     r'init\.upcycle=True builds a MoE from a dense run, but model\.num_experts=0'),
    ({'model.moe.remove_experts': 'x'}, r"model\.moe\.remove_experts='x' is not a list"),
    ({'model.moe.remove_experts': '4'}, r'remove_experts names expert 4, but the layers have '
                                        r'experts 0\.\.3'),
    ({'model.moe.remove_experts': '5:1'}, r'remove_experts names layer 5, which is not a MoE'),
    ({'model.moe.remove_experts': '1:1', 'model.scan_layers': True},
     r'remove_experts names layer 1, but model\.scan_layers runs every MoE layer of a run as '
     r'one; .*analyze\.without_expert'),
    ({'model.moe.remove_choices': '3'}, r'remove_choices names rank 3, but tokens choose '
                                        r'ranks 1\.\.2'),
    ({'model.moe.remove_choices': '1', 'model.moe.router': 'soft'},
     r"remove_choices needs router='token_choice'"),
])
def test_bad_values_raise_one_sentence(overrides, message):
  with pytest.raises(ConfigError, match=message) as info:
    config_lib.validate(tiny_config(**overrides))
  text = str(info.value)
  assert '\n' not in text and text.count('; ') >= 1  # what is wrong; how to fix it.


def test_tokamax_grouped_matmul_needs_tokamax_installed(monkeypatch):
  cfg = tiny_config(**{'model.moe.grouped_matmul': 'tokamax', 'model.moe.dropless': True})
  config_lib.validate(cfg)
  monkeypatch.setitem(sys.modules, 'tokamax', None)  # as if not installed
  with pytest.raises(ConfigError, match=r"grouped_matmul='tokamax' needs the tokamax package, "
                     r"which is not installed; run pip install 'moetrain\[gpu\]'"):
    config_lib.validate(cfg)


def test_head_dim_may_differ_from_d_model_over_heads():
  config_lib.validate(tiny_config(**{'model.num_heads': 3, 'model.num_kv_heads': 1,
                                     'model.head_dim': 16}))


def test_unknown_key_suggests_the_close_one():
  cfg = tiny_config()
  cfg.model.unlock()
  cfg.model.num_expert = 4
  with pytest.raises(ConfigError, match=r"unknown config key 'model\.num_expert'; did you "
                     r"mean 'model\.num_experts'\?"):
    config_lib.validate(cfg)


def test_warmup_longer_than_the_run_is_clamped_with_one_line():
  cfg = config_lib.validate(tiny_config(**{'train.steps': 5, 'train.warmup_steps': 30}))
  assert config_lib.clamp_warmup(cfg) == ('train.warmup_steps=30 exceeds train.steps=5, so '
                                          'the warmup is clamped to 5 steps.')
  assert cfg.train.warmup_steps == 5
  assert config_lib.clamp_warmup(cfg) is None


def test_top_k_equal_to_num_experts_is_valid():
  config_lib.validate(tiny_config(**{'model.moe.top_k': 4}))


def test_moe_layers():
  cfg = tiny_config(**{'model.num_layers': 6, 'model.first_k_dense': 1,
                       'model.moe_every': 2})
  assert config_lib.moe_layers(cfg.model) == [2, 4]
  assert config_lib.moe_layers(tiny_config(**{'model.num_experts': 0}).model) == []


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_is_valid(path):
  cfg = config_lib.load(path)
  before = cfg.to_dict()
  assert config_lib.validate(cfg) is cfg and cfg.to_dict() == before  # checks change nothing


def test_choices_are_the_allowed_values_of_real_keys():
  """CHOICES names real keys whose defaults it allows; a value outside it is refused with
  the key and the whole list, and validate changes nothing on the way."""
  defaults = config_lib.default_config()
  for key, values in config_lib.CHOICES.items():
    assert config_lib.get_key(defaults, key) in values, key
    cfg = tiny_config(**{key: 'nonsense'})
    before = cfg.to_dict()
    verb = 'is not supported' if key.endswith('dtype') else 'is not known'
    with pytest.raises(ConfigError, match=re.escape(
        f"{key}='nonsense' {verb}; use one of {', '.join(values)}.")):
      config_lib.validate(cfg)
    assert cfg.to_dict() == before


def test_load_errors(tmp_path):
  with pytest.raises(ConfigError, match='does not exist'):
    config_lib.load(tmp_path / 'missing.py')
  empty = tmp_path / 'empty.py'
  empty.write_text('x = 1\n')
  with pytest.raises(ConfigError, match=r'has no get_config\(\)'):
    config_lib.load(empty)


def test_dotted_keys_get_and_set():
  cfg = config_lib.default_config()
  config_lib.set_key(cfg, 'model.moe.top_k', 3)
  config_lib.set_key(cfg, 'seed', 7)
  assert config_lib.get_key(cfg, 'model.moe.top_k') == 3 == cfg.model.moe.top_k
  assert config_lib.get_key(cfg, 'seed') == 7
  saved = config_lib.from_dict({'model': {'num_experts': 16}, 'train': {'lr': 1e-4}})
  assert saved.model.num_experts == 16 and saved.train.lr == 1e-4
  assert saved.model.d_model == config_lib.default_config().model.d_model


def test_removal_lists_parse():
  assert config_lib.removed_experts(' 3, 1:5,') == [(None, 3), (1, 5)]
  assert config_lib.parse_ints('') == [] and config_lib.parse_ints('2, 3') == [2, 3]
  config_lib.validate(tiny_config(**{'model.moe.remove_experts': '0,1:3',
                                     'model.moe.remove_choices': '1,2'}))
