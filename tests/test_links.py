"""LinkProber: which probes it sends and what it concludes (fake clock, modelled links:
each device's own link, or one link all devices share)."""
from hypothesis import given, settings, strategies as st

from decolla.runtime.links import LinkProber
from decolla.runtime.messages import LinkEcho


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def started(*devices):
    """A prober on a fake clock, tracking `devices`."""
    clock = Clock()
    p = LinkProber(clock=clock)
    p.track(list(devices))
    return clock, p


def measure(prober, clock, links, slow=lambda dev, seq: 0.0, shared=False):
    """Answer probes as links of (rtt_s, bytes_per_s) per device would: one at a time, or
    all sent at once, each on its own link or one after the other on a shared one. Returns
    the probes sent as (device, size)."""
    sent = []
    while probes := prober.next_probes():
        done, busy_until = [], clock.t
        for dev, probe in probes:
            rtt, rate = links[dev]
            sent.append((dev, len(probe.payload)))
            wire = len(probe.payload) / rate
            busy_until = (busy_until + wire) if shared else clock.t + wire
            done.append((busy_until + rtt + slow(dev, probe.seq), dev, probe.seq))
        for at, dev, seq in sorted(done):
            clock.t = at
            prober.echo(LinkEcho(seq, dev))
    return sent


@settings(max_examples=60, deadline=None)
@given(rate=st.floats(1e4, 1e9), rtt=st.floats(1e-4, 0.05))
def test_measures_a_modelled_link(rate, rtt):
    clock, p = started("a")
    sent = measure(p, clock, {"a": (rtt, rate)})
    link = p.links["a"]
    assert abs(link.bytes_per_s / rate - 1) < 1e-6
    assert abs(link.rtt_s - rtt) < 1e-9
    sizes = [n for _, n in sent if n]
    assert max(sizes) <= p.max_bytes
    # the measuring probes are long enough on the wire, unless they hit the size cap
    assert sizes[-1] / rate >= p.target_s or sizes[-1] == p.max_bytes
    assert p.settled and p.bandwidth_mbit() == link.mbit


def test_one_probe_out_at_a_time_devices_in_turn():
    clock, p = started("a", "b")
    (first,) = p.next_probes()
    assert first[0] == "a" and p.next_probes() == []
    clock.t += 0.001
    p.echo(LinkEcho(first[1].seq, "a"))
    sent = measure(p, clock, {"a": (0.001, 1e6), "b": (0.002, 4e6)})
    devices = [d for d, _ in sent]
    assert devices[:-4] == sorted(devices[:-4])     # all of a's probes, then all of b's,
    assert set(devices[-4:-2]) == set(devices[-2:]) == {"a", "b"}   # then twice to each at once
    assert set(p.links) == {"a", "b"}
    assert abs(p.bandwidth_mbit() - (8 + 32) / 2) < 1e-6


def test_a_slowed_sample_does_not_lower_the_estimate():
    clock, p = started("a")
    sizes = []

    def slow(dev, seq):
        sizes.append(seq)
        return 0.5 if len(sizes) == 6 else 0.0     # the last sample waits behind other traffic
    measure(p, clock, {"a": (0.001, 1e6)}, slow)
    assert abs(p.links["a"].bytes_per_s - 1e6) < 1


def test_unanswered_probe_expires_and_late_echo_is_ignored():
    clock, p = started("a", "b")
    ((dev, probe),) = p.next_probes()
    assert not p.settled
    assert p.expire(probe.seq + 1) is None          # not the probe that is out
    assert p.expire(probe.seq) == "a"
    assert p.echo(LinkEcho(probe.seq, "a")) is None  # its echo arrives after all
    assert p.next_probes()[0][0] == "b"
    assert "a" not in p.links and not p.settled


def test_track_forgets_gone_devices():
    clock, p = started("a", "b")
    measure(p, clock, {"a": (0.001, 1e6), "b": (0.001, 2e6)})
    p.track(["b"])
    assert set(p.links) == {"b"} and p.settled


def test_a_device_that_leaves_mid_measurement_frees_the_prober():
    clock, p = started("a", "b")
    ((dev, probe),) = p.next_probes()
    p.track(["b"])
    assert p.echo(LinkEcho(probe.seq, "a")) is None
    assert p.next_probes()[0][0] == "b"


def test_nothing_measured_yet():
    p = LinkProber()
    assert p.bandwidth_mbit() is None and not p.settled and p.next_probes() == []


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 5), rates=st.lists(st.floats(1e4, 1e9), min_size=5, max_size=5),
       rtt=st.floats(1e-4, 0.02), shared=st.booleans())
def test_tells_own_links_from_one_shared_link(n, rates, rtt, shared):
    names = [f"d{i}" for i in range(n)]
    clock, p = started(*names)
    links = {d: (rtt, r) for d, r in zip(names, rates)}
    measure(p, clock, links, shared=shared)
    assert p.shared is shared and p.settled
    for d in names:
        assert abs(p.links[d].bytes_per_s / links[d][1] - 1) < 1e-6


def test_one_device_leaves_the_topology_unknown_and_a_new_one_is_compared_again():
    clock, p = started("a")
    measure(p, clock, {"a": (0.001, 1e6)})
    assert p.shared is None and p.settled
    p.track(["a", "b"])
    assert not p.settled
    measure(p, clock, {"a": (0.001, 1e6), "b": (0.001, 1e6)}, shared=True)
    assert p.shared is True and p.settled


def test_an_unanswered_all_at_once_probe_gives_up_without_deciding():
    clock, p = started("a", "b")
    links = {"a": (0.001, 1e6), "b": (0.001, 1e6)}
    while len(probes := p.next_probes()) == 1:
        (dev, probe), = probes
        clock.t += links[dev][0] + len(probe.payload) / links[dev][1]
        p.echo(LinkEcho(probe.seq, dev))
    assert {d for d, _ in probes} == {"a", "b"} and not p.settled
    p.echo(LinkEcho(probes[0][1].seq, probes[0][0]))
    assert p.expire(probes[1][1].seq) == probes[1][0]
    assert p.shared is None and p.settled and p.next_probes() == []


def test_a_device_briefly_unreachable_keeps_its_figure_and_is_not_probed_again():
    clock, p = started("a", "b")
    measure(p, clock, {"a": (0.001, 1e6), "b": (0.001, 2e6)})
    p.track(["a"], keep=["a", "b"])                  # b missed heartbeats
    assert set(p.links) == {"a", "b"} and p.settled
    p.track(["a", "b"])                              # ... and is back
    assert p.next_probes() == [] and p.settled


def test_a_stalled_device_in_one_all_at_once_round_does_not_make_own_links_look_shared():
    """Each round of the all-at-once probe can meet a device paused by its CPU quota; the
    fastest round decides."""
    clock, p = started("a", "b", "c")
    links = {d: (0.001, 1e6) for d in "abc"}
    first_together = []

    def slow(dev, seq):
        together = len(p.links) == 3
        if together and not first_together:
            first_together.append(seq)
        return 0.3 if together and seq < first_together[0] + 3 else 0.0   # round 1 stalls
    measure(p, clock, links, slow)
    assert p.shared is False and p.settled
