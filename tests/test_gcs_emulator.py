"""The GCS emulator (tests/gcs_emulator.py) and the three gs:// clients a workdir in a
bucket goes through: etils.epath (gcsfs), orbax (tensorstore's gcs driver) and
tensorboardX (google-cloud-storage). Every check reads the bucket back over the emulator's
JSON API, not through the client that wrote it."""

import json
import os
import pathlib
import struct
import subprocess
import sys
import uuid

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P


def fresh(gcs, name):
  """A new gs:// folder and its object prefix in the emulator's bucket."""
  prefix = f'{name}-{uuid.uuid4().hex[:8]}'
  return gcs.path(prefix), prefix


def test_epath_write_read_list_remove(gcs, rng):
  root, prefix = fresh(gcs, 'epath')
  payload = rng.bytes(1000)
  path = epath.Path(root) / 'sub' / 'blob.bin'
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(payload)
  (epath.Path(root) / 'config.json').write_text(json.dumps({'x': 1}))
  assert gcs.read(f'{prefix}/sub/blob.bin') == payload
  assert epath.Path(root, 'sub', 'blob.bin').read_bytes() == payload
  assert json.loads((epath.Path(root) / 'config.json').read_text()) == {'x': 1}
  assert sorted(p.name for p in epath.Path(root).iterdir()) == ['config.json', 'sub']
  path.unlink()
  assert not path.exists() and f'{prefix}/sub/blob.bin' not in gcs.objects(prefix)
  assert not pathlib.Path('gs:').exists()  # nothing went to a local folder named gs:.


def test_orbax_sharded_save_and_resharded_restore(gcs, rng):
  """What moetrain.checkpoint saves (a Composite of StandardSave arrays and JSON), into
  the bucket, restored onto another sharding."""
  root, prefix = fresh(gcs, 'orbax')
  w_ED, b_D = rng.normal(size=(8, 6)).astype(np.float32), rng.normal(size=8).astype(np.float32)
  mesh = jax.make_mesh((4, 2), ('expert', 'data'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  tree = {'w': jax.device_put(w_ED, NamedSharding(mesh, P('expert', 'data'))),
          'b': jax.device_put(b_D, NamedSharding(mesh, P()))}
  manager = ocp.CheckpointManager(epath.Path(root))
  for step in (1, 2):
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(jax.tree.map(lambda a: a * step, tree)),
        meta=ocp.args.JsonSave({'step': step})))
  manager.wait_until_finished()
  manager.close()
  names = gcs.objects(prefix)
  assert f'{prefix}/2/state/manifest.ocdbt' in names and f'{prefix}/2/meta/metadata' in names

  other = NamedSharding(mesh, P('data', None))
  target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=other if v.ndim == 2 else
                                    NamedSharding(mesh, P('expert')))
            for k, v in tree.items()}
  restored_manager = ocp.CheckpointManager(epath.Path(root))
  assert restored_manager.all_steps() == [1, 2]
  restored = restored_manager.restore(2, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  restored_manager.close()
  assert restored['meta'] == {'step': 2}
  assert restored['state']['w'].sharding == other
  np.testing.assert_array_equal(np.asarray(restored['state']['w']), 2 * w_ED)
  np.testing.assert_array_equal(np.asarray(restored['state']['b']), 2 * b_D)


def events(data: bytes) -> list:
  """The Event protos of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2
  out, i = [], 0
  while i < len(data):
    (length,) = struct.unpack('<Q', data[i:i + 8])
    event = event_pb2.Event()
    event.ParseFromString(data[i + 12:i + 12 + length])
    out.append(event)
    i += 12 + length + 4
  return out


WRITE_EVENTS = """
import json, sys
from tensorboardX import SummaryWriter
writer = SummaryWriter(sys.argv[1], filename_suffix='.test')
for step, value in enumerate(json.loads(sys.argv[2])):
  writer.add_scalar('loss', value, step)
writer.close()
"""


def test_tensorboardx_writes_events_into_the_bucket(gcs, rng):
  """In a child process, as training writes them: tensorboardX's GCS writer uploads its
  whole buffer once more when garbage-collected at exit, which must find the server up."""
  root, prefix = fresh(gcs, 'tb')
  values = rng.normal(size=5).astype(np.float32)
  subprocess.run([sys.executable, '-c', WRITE_EVENTS, f'{root}/tb',
                  json.dumps(values.tolist())], check=True, timeout=120,
                 env={**os.environ, **gcs.env})
  (name,) = gcs.objects(prefix)
  assert name.startswith(f'{prefix}/tb/events.out.tfevents.') and name.endswith('.test')
  logged = [(e.step, v.simple_value) for e in events(gcs.read(name)) for v in e.summary.value
            if v.tag == 'loss']
  assert [step for step, _ in logged] == list(range(5))
  np.testing.assert_array_equal([value for _, value in logged], values)
