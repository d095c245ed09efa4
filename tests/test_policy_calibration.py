"""bench.calibrate_sim's profile fit, on synthetic traces with known parameters."""
import numpy as np
import pytest

pytest.importorskip("scipy")
from bench import calibrate_sim as cs  # noqa: E402

UP, LAT, BW, AROUND, SPM, A_COMP = 100e6, 0.002, 50e6, 3e-4, {"pwconv": 1e-10, "dwconv3x3": 4e-10}, 5e-5


def _trace(seed: int) -> tuple[dict, list[str]]:
    """One inference as the runtime would record it: per stage one message per device,
    sent one after the other by the requester; the worker decodes, computes, encodes."""
    rng = np.random.default_rng(seed)
    kinds, recs, t = [], [], 0.0
    for s in range(12):
        kind = "pwconv" if s % 2 else "dwconv3x3"
        kinds.append(kind)
        devs = [d for d in ("dev1", "dev2") if rng.random() < 0.8] or ["dev1"]
        sent = t
        end_stage = t
        for dev in devs:
            n = int(rng.integers(1, 4))
            b_in = int(rng.integers(1e5, 1e6))
            received = sent + b_in / UP + LAT
            start = received + AROUND
            for c in range(n):
                macs = int(rng.integers(1e6, 5e6))
                end = start + A_COMP + SPM[kind] * macs
                out = int(rng.integers(1e4, 3e5))
                recs.append({"stage": s, "chunk": len(recs), "attempt": 0, "status": "won", "device": dev,
                             "macs": macs, "bytes_in": b_in if c == 0 else 0, "bytes_out": out,
                             "sent": sent, "received": received, "start": start, "end": end})
                start = end + AROUND
            last = recs[-1]
            last["returned"] = last["end"] + LAT + last["bytes_out"] / BW
            for r in recs[-n:]:
                r["returned"] = last["returned"]
            end_stage = max(end_stage, last["returned"])
            sent += b_in / UP
        t = end_stage + 1e-4
    return {"records": recs, "started": 0.0, "finished": t}, kinds


def test_component_profile_recovers_a_noise_free_runtime():
    traces = [_trace(i) for i in range(4)]
    stages = [st for tr, kinds in traces for st in cs.stages_of(tr, kinds)]
    prof, _ = cs.component_profile(stages)
    assert prof["uplink"] == pytest.approx(UP, rel=1e-6)
    for d in prof["devices"].values():
        assert d["sec_per_mac"]["pwconv"] == pytest.approx(SPM["pwconv"], rel=1e-3)
        assert d["sec_per_mac"]["dwconv3x3"] == pytest.approx(SPM["dwconv3x3"], rel=1e-3)
        assert d["chunk_overhead_s"] == pytest.approx(A_COMP + AROUND, rel=1e-2)
    # The simulator's model differs from the runtime's (per-chunk vs per-message
    # transfers, batched replies), but on this clean data it stays close.
    err = [cs.predict(prof, st) / st["measured_s"] - 1 for st in stages]
    assert np.median(np.abs(err)) < 0.2


def test_stages_with_retries_are_left_out():
    tr, kinds = _trace(0)
    tr["records"][0]["attempt"] = 1
    stages = cs.stages_of(tr, kinds)
    assert 0 not in {st["stage"] for st in stages} and len(stages) == len(kinds) - 1
