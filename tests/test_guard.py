"""The divergence guard on made-up step records: spikes against the recent median, the
last good checkpoint, skipping, and its history across a resume."""

import pytest

from moetrain import guard as guard_lib

from conftest import tiny_config


def make_guard(**overrides):
  return guard_lib.Guard.from_config(tiny_config(**{
      f'train.{k}': v for k, v in overrides.items()}).train)


def normal_records(rng, first, count, loss=2.5, grad=1.0):
  """Records of healthy steps: loss and gradient norm within +-20% of a level."""
  return [(s, 0.0, loss * rng.uniform(0.8, 1.2), grad * rng.uniform(0.8, 1.2))
          for s in range(first, first + count)]


def test_spike_is_relative_to_the_median_of_the_window():
  history = [2.0, 2.5, 3.0, 100.0]  # one outlier does not move the median.
  assert guard_lib.spike(8.0, history, 3.0) is None
  assert guard_lib.spike(8.5, history, 3.0).startswith('8.5 is 3.09x the median 2.75 of')
  assert guard_lib.spike(2.9, [0.1, 0.2], 3.0, floor=1.0) is None  # below 3 * 1 nat.
  assert guard_lib.spike(5.0, [], 3.0) is None


def test_healthy_steps_vouch_for_the_checkpoint_before_them(rng):
  guard = make_guard()
  for step in (10, 20):
    guard.check(normal_records(rng, step - 9, 10))
    guard.note_checkpoint(step)
  assert guard.last_good == 10  # step 11 vouched for it; nothing has vouched for 20 yet.
  guard.check(normal_records(rng, 21, 1))
  assert guard.last_good == 20


@pytest.mark.parametrize('record,cause', [
    ((23, 0.0, 40.0, 1.0), r'a loss spike \(40 is .*x the median'),
    ((23, 0.0, 2.5, 80.0), r'a gradient-norm spike \(80 is .*x the median'),
    ((23, 1.0, float('nan'), 1.0), r'a non-finite loss \(nan\)'),
    ((23, 1.0, 2.5, float('inf')), r'a non-finite gradient norm \(inf\)'),
    ((23, 1.0, 2.5, 1.0), r'non-finite new parameters'),
])
def test_a_bad_step_stops_and_names_the_last_good_checkpoint(record, cause, rng):
  guard = make_guard()
  guard.check(normal_records(rng, 1, 20))
  guard.note_checkpoint(20)
  guard.check(normal_records(rng, 21, 1))
  guard.note_checkpoint(22)  # saved after step 22; step 23 is bad, so 22 is not good.
  guard.check(normal_records(rng, 22, 1))
  with pytest.raises(guard_lib.DivergenceError, match=(
      r'^step 23 has ' + cause + r'.*, so training stopped before saving it; the last good '
      r'checkpoint is step 20: resume from it with --config\.checkpoint\.restore_step=20 '
      r'and a lower train\.lr \(it is 0\.003\)\.$')):
    guard.check([record])


def test_without_a_good_checkpoint_the_message_says_to_start_again(rng):
  guard = make_guard()
  guard.check(normal_records(rng, 1, 3))
  with pytest.raises(guard_lib.DivergenceError, match='no checkpoint is known to be good; '
                     r'lower train\.lr \(it is 0\.003\) and train again in a new --workdir'):
    guard.check([(4, 0.0, 1e6, 1.0)])


def test_skip_logs_bad_steps_until_too_many_in_a_row(rng):
  guard = make_guard(skip_nonfinite=True, max_bad_in_a_row=3)
  guard.check(normal_records(rng, 1, 10))
  guard.note_checkpoint(10)
  logs = []
  guard.check([(11, 1.0, float('nan'), 1.0), (12, 0.0, 40.0, 1.0)] + normal_records(rng, 13, 1),
              log=logs.append)
  assert logs[0].startswith('step 11: a non-finite loss (nan)')
  assert logs[0].endswith('; update skipped (1 of train.max_bad_in_a_row=3 bad steps in a row).')
  assert logs[1].startswith('step 12: a loss spike (40 is ')
  assert 'update applied (2 of' in logs[1]
  assert guard.last_good is None and guard.bad_in_a_row == 0  # step 11 did not vouch for 10.
  with pytest.raises(guard_lib.DivergenceError, match=r'^step 16 has a loss spike .* \(3 bad '
                     r'steps in a row\), so training stopped'):
    guard.check([(s, 0.0, 1e4, 1.0) for s in (14, 15, 16)], log=logs.append)


def test_history_survives_a_resume_through_the_checkpoint_metadata(rng):
  guard = make_guard(spike_window=5)
  guard.check(normal_records(rng, 1, 8))
  guard.note_checkpoint(8)
  guard.check(normal_records(rng, 9, 1))
  resumed = guard_lib.Guard.from_config(tiny_config(**{'train.spike_window': 5}).train,
                                        guard.state())
  assert list(resumed.losses) == list(guard.losses) and len(resumed.losses) == 5
  assert resumed.last_good == 8
  with pytest.raises(guard_lib.DivergenceError, match='the last good checkpoint is step 8'):
    resumed.check([(10, 0.0, 50.0, 1.0)])


def test_spike_window_0_turns_spike_detection_off(rng):
  guard = make_guard(spike_window=0)
  guard.check(normal_records(rng, 1, 5) + [(6, 0.0, 1e6, 1e6)])
  with pytest.raises(guard_lib.DivergenceError):
    guard.check([(7, 1.0, float('inf'), 1.0)])
