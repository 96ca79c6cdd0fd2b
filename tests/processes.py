"""Helpers for tests that run servers as child processes (SLURM daemons, the GCS emulator,
the stub gcloud's workers)."""

import socket
import subprocess


def free_port() -> int:
  """A TCP port nothing listens on right now."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def stop(process: subprocess.Popen, timeout: float):
  """SIGTERM, then SIGKILL if `process` has not exited after `timeout` seconds."""
  if process.poll() is None:
    process.terminate()
  try:
    process.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()
