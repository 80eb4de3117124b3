"""The interleaved-round arithmetic of `emu bench` on fake timers (speed itself is never asserted)."""

import pytest

from emu.bench import RatioStats, Timing, interleave, per_round_ratios, steps_for, summarize


def test_summarize_gives_median_range_and_rounds():
    stats = summarize([3.0, 1.0, 10.0, 2.0])
    assert (stats.median, stats.low, stats.high, stats.rounds) == (2.5, 1.0, 10.0, 4)
    assert stats.text() == "2.50 [1.00-10.00]"
    assert stats.as_dict() == {"median": 2.5, "min": 1.0, "max": 10.0, "rounds": 4, "values": [3.0, 1.0, 10.0, 2.0]}
    assert summarize([1.5]) == RatioStats(1.5, 1.5, 1.5, (1.5,))
    with pytest.raises(ValueError, match="at least one"):
        summarize([])


def scripted(seconds_per_step, calls):
    """A fake runner: call r takes exactly seconds_per_step[r] per step (no clock involved)."""
    def run(steps, name=None):
        index = len(calls[name])
        calls[name].append(steps)
        calls["order"].append(name)
        return Timing(steps, steps * seconds_per_step[index], cpu_seconds=0.5 * steps * seconds_per_step[index])
    return run


def test_interleaved_rounds_alternate_and_give_per_round_ratios():
    calls = {"emu": [], "peer": [], "fft": [], "order": []}
    emu = scripted([0.010, 0.020, 0.010, 0.040, 0.010], calls)
    peer = scripted([0.030, 0.030, 0.050, 0.040, 0.020], calls)
    fft = scripted([0.005, 0.010, 0.004, 0.010, 0.008], calls)
    runners = {"emu": lambda k: emu(k, "emu"), "peer": lambda k: peer(k, "peer"), "fft": lambda k: fft(k, "fft")}
    timings = interleave(runners, {"emu": 7, "peer": 3, "fft": 11}, rounds=5)
    # emu, peer, fft in even rounds, reversed in odd ones, each with its own step count every time
    assert calls["order"] == ["emu", "peer", "fft", "fft", "peer", "emu"] * 2 + ["emu", "peer", "fft"]
    assert calls["emu"] == [7] * 5 and calls["peer"] == [3] * 5 and calls["fft"] == [11] * 5
    assert [len(timings[name]) for name in runners] == [5, 5, 5]
    # vs peer = batch * emu traj-steps/s over the peer's = batch * peer s/step / emu s/step, per round
    vs_peer = per_round_ratios(timings["peer"], timings["emu"], scale=2)
    assert vs_peer == pytest.approx([6.0, 3.0, 10.0, 2.0, 4.0])
    stats = summarize(vs_peer)
    assert (stats.median, stats.low, stats.high, stats.rounds) == pytest.approx((4.0, 2.0, 10.0, 5))
    step_over_fft = summarize(per_round_ratios(timings["emu"], timings["fft"]))
    assert step_over_fft.values == pytest.approx((2.0, 2.0, 2.5, 4.0, 1.25))
    assert step_over_fft.median == pytest.approx(2.0)
    assert timings["emu"][1].steps_per_second == pytest.approx(50.0)
    with pytest.raises(ValueError, match="rounds differ"):
        per_round_ratios(timings["emu"], timings["fft"][:4])
    with pytest.raises(ValueError, match="rounds"):
        interleave(runners, {"emu": 1, "peer": 1, "fft": 1}, rounds=0)


def test_steps_for_probes_then_sizes_the_chunk():
    probes = []

    def run(steps):  # 1 ms per step
        probes.append(steps)
        return Timing(steps, steps * 1e-3)

    assert steps_for(run, seconds=0.5) == 500
    assert probes == [1, 4, 16, 64]  # until a probe lasts 20 ms
    probes.clear()
    assert steps_for(run, seconds=0.123, granularity=10) == 120  # a multiple of the granularity
    assert probes == [10, 40]
    probes.clear()
    assert steps_for(run, seconds=1e-6, granularity=10) == 10  # at least one granule

    def rounding_up(steps):  # a peer that steps in granules of 10 whatever it is asked
        granules = -(-steps // 10)
        return Timing(granules * 10, granules * 10 * 2e-3)

    assert steps_for(rounding_up, seconds=0.2, granularity=10) == 100
