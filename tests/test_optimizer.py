"""The optimizer: learning-rate schedule, weight decay on matrices only, gradient clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moetrain import optimizer as optimizer_lib
from moetrain import state as state_lib
from moetrain.parallel import mesh as mesh_lib

from conftest import tiny_config


def test_schedule_warms_up_then_decays_to_min_lr():
  t = tiny_config(**{'train.steps': 100, 'train.warmup_steps': 10, 'train.lr': 1.0,
                     'train.min_lr_ratio': 0.1}).train
  schedule = optimizer_lib.make_schedule(t)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(100)) == pytest.approx(0.1)
  assert float(schedule(55)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)


def test_weight_decay_skips_vectors():
  """With zero gradients the update is the decay alone: matrices shrink, vectors don't."""
  cfg = tiny_config(**{'train.weight_decay': 0.5, 'model.vocab_size': 128})
  tx = optimizer_lib.make_optimizer(cfg.train)
  mesh = mesh_lib.make_mesh(cfg, devices=jax.devices()[:1])
  state = state_lib.init_state(cfg, mesh, tx)[1]
  zero_grads = jax.tree.map(jnp.zeros_like, state.params)
  _, opt_state = tx.update(zero_grads, state.opt_state, state.params)  # lr is 0 at step 0.
  updates, _ = tx.update(zero_grads, opt_state, state.params)
  flat = nnx.to_flat_state(updates)
  for path, leaf in flat:
    value = np.asarray(leaf.get_value())
    if value.ndim >= 2:
      assert np.abs(value).max() > 0, path
    else:
      assert np.abs(value).max() == 0, path


@pytest.mark.parametrize('max_norm', [0.5, 1e3])  # clipping and not clipping.
def test_clip_by_global_norm_equals_optax(max_norm, rng):
  grads = {'a': rng.standard_normal((5, 3)).astype(np.float32),
           'b': rng.standard_normal((7,)).astype(np.float32)}
  ours = optimizer_lib.clip_by_global_norm(max_norm)
  ref = optax.clip_by_global_norm(max_norm)
  got, _ = ours.update(grads, ours.init(grads))
  want, _ = ref.update(grads, ref.init(grads))
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6), got, want)
  norm = float(optax.tree.norm(got))
  assert norm == pytest.approx(min(max_norm, float(optax.tree.norm(grads))), rel=1e-6)
