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
