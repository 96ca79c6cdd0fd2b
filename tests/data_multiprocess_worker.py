"""Worker for tests/test_data.py: one of N local jax processes (2 CPU devices each) builds
its slice of each batch, makes it a global jax.Array with data.to_global, and checks the
gathered array against the 1-process global batch.

usage: python tests/data_multiprocess_worker.py PORT NUM_PROCESSES PROCESS_ID
"""

import pathlib
import sys

import jax

jax.config.update('jax_num_cpu_devices', 2)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from moetrain import config as config_lib  # noqa: E402
from moetrain import data as data_lib  # noqa: E402
from moetrain.parallel import mesh as mesh_lib  # noqa: E402


def main(port: str, num_processes: int, process_id: int):
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                             num_processes=num_processes, process_id=process_id)
  cfg = config_lib.default_config()
  cfg.data.update(dict(max_documents=12, seq_len=32, batch_size=8, eval_fraction=0.25,
                       document_mask=True))
  cfg.train.eval_batches = 2
  local = data_lib.make_data(cfg)  # this process's slices (jax.process_index()).
  whole = data_lib.make_data(cfg, 0, 1)
  sharding = mesh_lib.batch_sharding(mesh_lib.make_mesh(cfg))
  for _ in range(3):
    got = data_lib.to_global(next(local.train), sharding)
    want = next(whole.train)
    for key, want_BL in want.items():
      assert got[key].shape == want_BL.shape, (key, got[key].shape)
      np.testing.assert_array_equal(
          multihost_utils.process_allgather(got[key], tiled=True), want_BL)
  print(f'process {process_id} ok')


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
