"""Supervisor: deadlines from moving estimates, slack and floor; suspect -> dead -> back."""
from dataclasses import dataclass

import pytest

from decolla.runtime.supervisor import Supervisor


@dataclass
class Info:
    name: str
    status: str = "ready"
    speed: float = 1e9
    beats: int = 0
    available: float = 1.0
    queue: int = 0
    incarnation: str = ""

    @property
    def alive(self):
        return self.status == "ready"


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def make(**kw):
    clock = Clock()
    sup = Supervisor(clock=clock, **kw)
    sup.update_membership([Info("a"), Info("b", speed=2e9)])
    return sup, clock


def test_deadline_is_slack_times_prediction_with_floor():
    sup, clock = make(slack=3.0, floor=0.2, prior_overhead=0.01, prior_bandwidth=1e8)
    # 1e9 MACs at 1e9 MAC/s + 1e7 bytes at 1e8 B/s + 10 ms
    assert sup.predict("a", 1e9, 1e7) == pytest.approx(1.0 + 0.1 + 0.01)
    assert sup.dispatched("a", "k1", 1e9, 1e7) == pytest.approx(clock.t + 3 * 1.11)
    # a tiny chunk gets the floor
    assert sup.timeout("b", 10, 10) == 0.2


def test_queued_work_pushes_later_deadlines_back():
    sup, clock = make(slack=2.0, floor=0.01, prior_overhead=0.0)
    d1 = sup.dispatched("a", "k1", 1e9, 0)
    d2 = sup.dispatched("a", "k2", 1e9, 0)
    assert d2 - clock.t == pytest.approx(2 * (d1 - clock.t))
    sup.released("a", "k1")
    sup.released("a", "k2")
    assert sup.devices["a"].queued_macs == 0


def test_estimates_follow_measurements():
    sup, _ = make(alpha=0.5)
    before = sup.predict("a", 1e8, 1e6)
    for i in range(20):   # the device turns out 10x slower than reported
        sup.dispatched("a", i, 1e8, 1e6)
        sup.completed("a", i, 1e8, 1e6, compute_s=1.0, rtt_s=1.05)
    assert sup.devices["a"].rate == pytest.approx(1e8, rel=1e-3)
    assert sup.predict("a", 1e8, 1e6) > 5 * before


def test_time_queued_behind_other_chunks_is_not_taken_for_transfer_time():
    sup, _ = make(alpha=0.5, prior_overhead=0.005, prior_bandwidth=1e8)
    before = (sup.devices["a"].overhead, sup.devices["a"].sec_per_byte)
    for i in range(10):   # ten chunks queue up; each waits for the ones before it
        sup.dispatched("a", i, 1e8, 1e3)
    for i in range(1, 10):
        sup.completed("a", i, 1e8, 1e3, compute_s=0.2, rtt_s=0.2 * (i + 1))
    assert (sup.devices["a"].overhead, sup.devices["a"].sec_per_byte) == before
    assert sup.devices["a"].rate == pytest.approx(5e8, rel=1e-2)   # compute time still counts
    sup.completed("a", 0, 1e8, 1e3, compute_s=0.1, rtt_s=0.2)   # the first was sent alone
    assert sup.devices["a"].overhead > before[0]


def test_a_late_result_after_a_missed_deadline_still_teaches_the_transfer_estimate():
    sup, clock = make(alpha=0.5, prior_overhead=0.005, prior_bandwidth=1e8)
    before = sup.predict("a", 1e6, 1e6)
    for i in range(5):          # the link became 1000x slower: every chunk misses t2, then arrives
        sup.dispatched("a", i, 1e6, 1e6)
        sup.missed("a", i)
        sup.completed("a", i, 1e6, 1e6, compute_s=0.001, rtt_s=10.0)
    assert sup.predict("a", 1e6, 1e6) > 100 * before


def test_a_late_result_teaches_even_after_its_attempt_was_released():
    sup, _ = make(alpha=0.5, prior_overhead=0.005, prior_bandwidth=1e8)
    before = sup.predict("a", 1e6, 1e6)
    for i in range(5):          # t2 missed, a duplicate elsewhere won, then the original arrives
        sup.dispatched("a", i, 1e6, 1e6)
        sup.missed("a", i)
        sup.released("a", i)
        sup.completed("a", i, 1e6, 1e6, compute_s=0.001, rtt_s=10.0)
    assert sup.predict("a", 1e6, 1e6) > 100 * before


def test_attempts_that_never_return_are_not_remembered_forever():
    from decolla.runtime.supervisor import UNQUEUED_KEEP
    sup, _ = make()
    for i in range(UNQUEUED_KEEP + 50):
        sup.dispatched("a", i, 1e6, 1e6)
        sup.missed("a", i)
    assert len(sup.devices["a"].unqueued) == UNQUEUED_KEEP


def test_a_stated_link_speed_bounds_the_predicted_transfer_time():
    fast, _ = make(prior_overhead=0.0, prior_bandwidth=1e9)
    stated, _ = make(prior_overhead=0.0, prior_bandwidth=1e9, link_bytes_per_s=125e3)  # 1 Mb/s
    assert fast.predict("a", 0, 125e3) == pytest.approx(125e-6)
    assert stated.predict("a", 0, 125e3) == pytest.approx(1.0)


def test_misses_make_a_device_suspect_then_dead_and_beats_revive_it():
    sup, _ = make(dead_after=3, revive_beats=2)
    assert sup.missed("a", 1) == "suspect"
    assert "a" in sup.usable()
    assert sup.missed("a", 2) == "suspect"
    assert sup.missed("a", 3) == "dead"
    assert sup.usable() == ["b"]
    assert "a" in sup.members()           # registrar still lists it
    sup.update_membership([Info("a", beats=1), Info("b")])
    assert sup.usable() == ["b"]          # one beat is not enough
    sup.update_membership([Info("a", beats=2), Info("b")])
    assert sup.usable() == ["a", "b"]


def test_a_suspect_gets_no_new_work_until_it_beats_again_and_its_misses_still_count():
    sup, _ = make(dead_after=3)
    sup.update_membership([Info("a", beats=5), Info("b", beats=5)])
    sup.missed("a", 1)
    assert sup.preferred() == ["b"] and sup.usable() == ["a", "b"]
    sup.update_membership([Info("a", beats=5), Info("b", beats=6)])
    assert sup.preferred() == ["b"]                 # no beat from a since its miss
    sup.update_membership([Info("a", beats=6), Info("b", beats=7)])
    assert sup.preferred() == ["a", "b"]
    sup.missed("a", 2)
    assert sup.missed("a", 3) == "dead"             # three misses in all
    sup.missed("b", 4)
    assert sup.preferred() == ["b"]                 # the only usable one, suspect or not


def test_a_broken_connection_makes_a_device_suspect_without_counting_a_miss():
    sup, _ = make()
    sup.suspect("a")
    assert sup.preferred() == ["b"] and sup.devices["a"].misses == 0
    sup.update_membership([Info("a", beats=1), Info("b", beats=1)])
    assert sup.preferred() == ["a", "b"]


def test_any_result_clears_suspicion():
    sup, _ = make(dead_after=2)
    sup.missed("a", 1)
    sup.missed("a", 2)
    assert sup.devices["a"].state == "dead"
    sup.completed("a", 3, 1e6, 100, 0.01, 0.02)   # a late result proves it runs
    assert sup.devices["a"].state == "alive" and "a" in sup.usable()


def test_membership_changes_report_lost_devices():
    sup, _ = make()
    assert sup.update_membership([Info("a", status="unresponsive"), Info("b")]) == ["a"]
    assert sup.usable() == ["b"]
    assert sup.update_membership([Info("a")]) == ["b"]      # b vanished from the snapshot
    assert sup.usable() == ["a"]


def test_best_prefers_alive_then_earliest_finish():
    sup, _ = make()
    assert sup.best(["a", "b"], 1e9, 0) == "b"      # b is twice as fast
    sup.missed("b", 1)
    assert sup.best(["a", "b"], 1e9, 0) == "a"      # suspects only when nothing else
    assert sup.best([], 1, 1) is None


def test_device_states_feed_the_allocator():
    sup, _ = make()
    sup.dispatched("a", 1, 5e8, 0)
    states = {d.name: d for d in sup.device_states()}
    assert states["a"].queue == 1 and states["a"].busy_s == pytest.approx(0.5)
    assert states["b"].speed == 2e9 and states["b"].alive


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        Supervisor(slack=0.5)
    with pytest.raises(ValueError):
        Supervisor(floor=0)


def test_a_short_fast_chunk_does_not_inflate_the_speed_estimate():
    """Rate = moving MACs / moving seconds: each chunk counts by its time. Under a CPU quota
    a 2 ms strip can run at full host speed (10x the device's); averaging MAC/s per chunk
    let it triple the estimate, and the allocator then piled requests on that device."""
    sup, _ = make(alpha=0.3)
    for i in range(30):                      # whole forwards: 3e8 MACs in 0.1 s
        sup.dispatched("a", i, 3e8, 1e3)
        sup.completed("a", i, 3e8, 1e3, compute_s=0.1, rtt_s=0.1)
    assert sup.devices["a"].rate == pytest.approx(3e9, rel=1e-3)
    sup.dispatched("a", 99, 4e7, 1e3)
    sup.completed("a", 99, 4e7, 1e3, compute_s=0.002, rtt_s=0.003)   # 2e10 MAC/s
    assert sup.devices["a"].rate < 1.1 * 3e9


def test_a_new_incarnation_is_usable_at_once_whatever_its_beat_count():
    """A restarted device's heartbeat count starts again at 0: its new worker (another
    incarnation) is used as soon as the registrar reports it ready."""
    sup, _ = make(dead_after=1, revive_beats=2)
    sup.update_membership([Info("a", beats=40, incarnation="w1"), Info("b", incarnation="w2")])
    sup.dispatched("a", "k1", 1e6, 100)
    assert sup.missed("a", "k0") == "dead"
    sup.update_membership([Info("a", status="gone", beats=40, incarnation="w1"),
                           Info("b", incarnation="w2")])
    sup.update_membership([Info("a", status="starting", beats=0, incarnation="w3"),
                           Info("b", incarnation="w2")])
    assert sup.usable() == ["b"]          # not ready yet
    sup.update_membership([Info("a", beats=0, incarnation="w3"), Info("b", incarnation="w2")])
    assert sup.usable() == ["a", "b"]
    assert sup.devices["a"].outstanding == {}    # the old worker's attempt died with it
