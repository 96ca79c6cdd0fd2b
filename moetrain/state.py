"""The train state (`TrainState`: parameters, optimizer state, router biases, RNG, step):
built fresh, from given parameters, or as shapes only, each leaf laid out on the mesh by
its parameter's logical axes (`moetrain.parallel.mesh.state_shardings`)."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moetrain.model.transformer import Transformer
from moetrain.parallel import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes. `model_state` holds non-trained variables (the
  router biases of aux-loss-free balancing); `rng` is raw uint32 key data."""
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  model_state: nnx.State
  rng: jax.Array


def split_model(model):
  """graphdef, trained params, other variables."""
  return nnx.split(model, nnx.Param, ...)


def _create_fn(cfg, tx):
  """() -> a fresh TrainState (to be traced by eval_shape or jit)."""
  def create():
    model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed))
    _, params, model_state = split_model(model)
    rng = jax.random.key_data(jax.random.key(cfg.seed + 1))
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), model_state, rng)

  return create


def abstract_state(cfg, mesh, tx):
  """Shapes, dtypes and shardings of the train state, without computing or compiling.

  Returns (graphdef, abstract TrainState of ShapeDtypeStructs, state_shardings).
  """
  abstract = jax.eval_shape(_create_fn(cfg, tx))
  graphdef = split_model(nnx.eval_shape(lambda: Transformer(cfg.model,
                                                             rngs=nnx.Rngs(0))))[0]
  return graphdef, abstract, state_shardings(abstract, mesh)


def init_state(cfg, mesh, tx):
  """Creates the model and optimizer state directly in their shardings on `mesh`.

  Returns (graphdef, state, state_shardings).
  """
  graphdef, _, shardings = abstract_state(cfg, mesh, tx)
  with jax.set_mesh(mesh):
    state = jax.jit(_create_fn(cfg, tx), out_shardings=shardings)()
  return graphdef, state, shardings


def state_with_params(cfg, mesh, tx, params):
  """A train state at step 0 whose parameters are `params` (an nnx.State of arrays with the
  structure of the model's), with a fresh optimizer state, model state and RNG.

  Returns (graphdef, state, state_shardings), like `init_state`.
  """
  graphdef, _, shardings = abstract_state(cfg, mesh, tx)
  create = _create_fn(cfg, tx)

  def replace(params):
    return create().replace(params=params, opt_state=tx.init(params))

  with jax.set_mesh(mesh):
    state = jax.jit(replace, out_shardings=shardings)(params)
  return graphdef, state, shardings


def state_shardings(abstract_state: TrainState, mesh):
  """Shardings of a TrainState: every Variable with logical `axes` (the params and the
  optimizer moments, which keep their metadata) follows them; the rest is replicated."""
  return mesh_lib.state_shardings(abstract_state, mesh)


def restore_target(abstract, shardings):
  """The abstract train state with each leaf's sharding: what a checkpoint restores into."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
