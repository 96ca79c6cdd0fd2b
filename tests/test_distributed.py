"""Multi-process start-up arguments (the real 2-process run is tests/test_multihost.py)."""

import pytest

from moetrain.config import ConfigError
from moetrain.parallel import distributed


@pytest.mark.parametrize('args,message', [
    (('127.0.0.1:1234', 2, None), 'needs --coordinator_address, --num_processes and '
                                  '--process_id together'),
    ((None, 2, 0), 'together'),
    (('127.0.0.1:1234', 2, 2), r'--process_id=2 is outside \[0, 2\)'),
    (('127.0.0.1:1234', 2, -1), r'--process_id=-1 is outside'),
])
def test_bad_process_arguments(args, message):
  with pytest.raises(ConfigError, match=message):
    distributed.initialize(*args)


def test_single_process_needs_nothing():
  assert distributed.initialize(None, None, None) is False


def test_heartbeat_timeout_below_one_second_is_refused():
  with pytest.raises(ConfigError, match=r'--heartbeat_timeout=0 must be at least 1 second'):
    distributed.initialize('127.0.0.1:1234', 2, 0, heartbeat_timeout=0)


def test_dead_peer_message_names_the_process():
  assert distributed.dead_peer_message(0, 3, 10).startswith(
      'moetrain: process 0 (the coordinator) stopped responding (no sign of life for 10 s), '
      'so process 3 stops too;')
  assert distributed.dead_peer_message(2, 0, 12.0).startswith('moetrain: process 2 stopped')


ADDRESS = {'JAX_COORDINATOR_ADDRESS': '10.0.0.1:8476'}


@pytest.mark.parametrize('environ,expected', [
    ({}, (None, None, None)),
    (ADDRESS, (None, None, None)),  # JAX itself reads the address alone.
    ({**ADDRESS, 'JAX_NUM_PROCESSES': '4', 'JAX_PROCESS_ID': '3'}, ('10.0.0.1:8476', 4, 3)),
])
def test_process_environment(environ, expected):
  assert distributed.from_environment(environ) == expected


@pytest.mark.parametrize('environ,message', [
    ({'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '0'},
     'found JAX_NUM_PROCESSES and JAX_PROCESS_ID but not JAX_COORDINATOR_ADDRESS'),
    ({**ADDRESS, 'JAX_PROCESS_ID': '0'}, 'but not JAX_NUM_PROCESSES; set all of'),
    ({**ADDRESS, 'JAX_NUM_PROCESSES': 'two', 'JAX_PROCESS_ID': '0'}, 'must be integers'),
    ({**ADDRESS, 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '2'},
     r'JAX_PROCESS_ID=2 is outside \[0, JAX_NUM_PROCESSES=2\)'),
])
def test_bad_process_environment(environ, message):
  with pytest.raises(ConfigError, match=message):
    distributed.from_environment(environ)
