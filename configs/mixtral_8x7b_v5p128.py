"""Mixtral 8x7B (configs/mixtral_8x7b.py) set up for a TPU v5p-128 slice (64 chips):
sequence 4096, global batch 64 (one sequence per chip).

- mesh: experts over `expert` (8, one expert per chip group), every weight and its Adam
  moments over `fsdp` (8) as well, so each chip stores 1/64 of the state;
- remat 'full' and scanned layers (one traced layer: the compile does not grow with
  depth);
- splash attention on TPU (`auto`), cross-entropy in chunks of 512 positions, the
  dropless token exchange in chunks of 512 tokens per chip.

`moetrain compile --config=configs/mixtral_8x7b_v5p128.py --topology=v5p-128` prints its
per-chip memory (the README's mesh section shows the table).
"""

import pathlib

from moetrain import config as config_lib


def get_config():
  config = config_lib.load(pathlib.Path(__file__).with_name('mixtral_8x7b.py'))
  m = config.model
  m.remat = 'full'
  m.scan_layers = True
  m.attention_impl = 'auto'
  m.loss_chunk = 512
  # Dropless receive buffers hold every token of every chip of the expert axis (the worst
  # case): exchanging a chip's 4096 tokens in chunks of 512 makes them 8x smaller.
  m.moe.expert_chunk = 512
  config.data.batch_size = 64
  config.mesh.data = 1
  config.mesh.fsdp = 8
  config.mesh.expert = 8
  return config
