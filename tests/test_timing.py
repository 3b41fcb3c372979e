"""calibration/timing.py: the phases of quantize's and verify's timing line."""

import time

import pytest

from calibration.timing import OTHER, PhaseTimer, phases_text


def test_nested_phases_are_exclusive_and_add_up_to_the_total():
    timer = PhaseTimer()
    with timer.phase("write"):
        time.sleep(0.02)
        with timer.phase("quantize"):  # the writer's clock stops while quantize runs
            time.sleep(0.05)
        time.sleep(0.02)
    with timer.phase("quantize"):
        time.sleep(0.01)
    time.sleep(0.01)  # in no phase
    facts = timer.facts()
    phases = facts["phases"]
    assert set(phases) == {"write", "quantize", OTHER}
    assert phases["quantize"] == pytest.approx(0.06, abs=0.02)
    assert phases["write"] == pytest.approx(0.04, abs=0.02)
    assert phases[OTHER] >= 0.01
    assert sum(phases.values()) == pytest.approx(facts["seconds"], rel=1e-6)
    assert facts["dominant"] == "quantize"


def test_a_phase_that_raises_is_still_counted():
    timer = PhaseTimer()
    with pytest.raises(ValueError), timer.phase("read"):
        time.sleep(0.01)
        raise ValueError
    with timer.phase("write"):
        pass
    assert timer.facts()["phases"]["read"] >= 0.01


def test_phases_text_puts_the_largest_first_and_other_last():
    assert phases_text({OTHER: 5.0, "read": 0.5, "quantize": 1.25}) == "quantize 1.25 s, read 0.50 s, other 5.00 s"


def test_sync_runs_before_every_clock_reading():
    """On a GPU the phase's kernels are waited for before its clock stops (sync: cuda.synchronize)."""
    calls = []
    timer = PhaseTimer(sync=lambda: calls.append(len(calls)))
    with timer.phase("op"):
        with timer.phase("metrics"):
            pass
    assert len(calls) == 4  # entering and leaving each phase
