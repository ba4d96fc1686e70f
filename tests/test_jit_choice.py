"""`FasterOf`: every call runs exactly one version; the faster is kept, robustly."""

import numpy as np
import pytest
import tensorflow as tf

from tfp_naf.jit_choice import PLAIN, XLA, FasterOf


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def versions(clock, cost_plain, cost_xla, log):
    """Two fake steps: each advances the clock by its cost (a function of the call
    count, for drift) and returns its own name."""

    def make(name, cost):
        def step(x):
            clock.now += cost(len(log))
            log.append(name)
            return tf.constant(x)
        return step

    return make(PLAIN, cost_plain), make(XLA, cost_xla)


def run(cost_plain, cost_xla, calls=100, **kwargs):
    clock, log = FakeClock(), []
    plain, xla = versions(clock, cost_plain, cost_xla, log)
    step = FasterOf(plain, xla, clock=clock, warmup_calls=2, timed_blocks=4, **kwargs)
    for i in range(calls):
        assert int(step(i)) == i  # Each call's own result comes back.
    return step, log


def test_every_call_runs_one_version_and_the_faster_is_kept():
    step, log = run(lambda i: 1.0, lambda i: 0.5)
    assert len(log) == 100  # No call dropped or doubled.
    decided = 2 * 2 + 4 * 4
    assert log[:decided].count(PLAIN) == log[:decided].count(XLA) == decided // 2
    assert step.choice == XLA and set(log[decided:]) == {XLA}
    assert step.ratio == pytest.approx(0.5)
    assert step.seconds == {PLAIN: pytest.approx(1.0), XLA: pytest.approx(0.5)}


@pytest.mark.parametrize("xla_cost", [0.97, 1.0, 2.0])
def test_plain_is_kept_unless_xla_is_faster_by_the_margin(xla_cost):
    step, log = run(lambda i: 1.0, lambda i: xla_cost)
    assert step.choice == PLAIN and set(log[20:]) == {PLAIN}


def test_a_drift_in_step_time_does_not_favour_either_version():
    # The same cost for both, falling fast as if warming up: plain alternation
    # would credit whichever runs later in each pair.
    step, _ = run(lambda i: 10.0 / (1 + i), lambda i: 10.0 / (1 + i))
    assert step.choice == PLAIN
    assert step.ratio == pytest.approx(1.0, abs=0.05)


def test_an_xla_compilation_error_falls_back_to_plain_without_losing_the_call():
    clock, log = FakeClock(), []
    plain, _ = versions(clock, lambda i: 1.0, lambda i: 1.0, log)

    def xla(x):
        raise tf.errors.InvalidArgumentError(None, None, "Detected unsupported operations\nmore")

    step = FasterOf(plain, xla, clock=clock)
    assert [int(step(i)) for i in range(5)] == list(range(5))
    assert log == [PLAIN] * 5 and step.choice == PLAIN
    assert step.xla_error == "InvalidArgumentError: Detected unsupported operations"


def test_other_errors_are_raised():
    def boom(x):
        raise ValueError("bad data")

    step = FasterOf(boom, boom)
    with pytest.raises(ValueError, match="bad data"):
        step(0)


@pytest.mark.parametrize("kwargs", [dict(warmup_calls=0), dict(timed_blocks=0),
                                    dict(margin=0.0), dict(margin=1.5), dict(margin=np.nan)])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        FasterOf(abs, abs, **kwargs)
