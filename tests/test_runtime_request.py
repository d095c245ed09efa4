"""The request state machine alone: events in, actions out, time passed in (no actors,
sockets or clocks). Workers are simulated by computing each delivered chunk here."""
import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decolla import reference
from decolla.allocators import make_allocator
from decolla.loader import load_model
from decolla.plans import build_plan
from decolla.plans.compute import compute_chunk
from decolla.runtime import wire
from decolla.runtime.messages import (Cancel, ChunkEvent, ChunkFailed, ChunkResult,
                                      ConfigureRequester, DeviceInfo, InferError, InferReply,
                                      StageWork)
from decolla.runtime.plan_choice import PlanChooser
from decolla.runtime.request import (MAX_ATTEMPTS, Context, Deliver, Request, RunLocal, Tell,
                                     Time)
from decolla.runtime.supervisor import Supervisor

SPEC = "mobilenet_v2:width=0.35,input_size=32,num_classes=10,seed=0"


@pytest.fixture(scope="module")
def model():
    return load_model(SPEC)


@pytest.fixture(scope="module")
def image(model):
    return np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)


def devices(*names, status="ready", incarnation=""):
    return [DeviceInfo(n, worker=f"addr-{n}", status=status, speed=1e9,
                       incarnation=incarnation) for n in names]


def make_request(model, image, names=("a", "b"), k=2, kind="layer", t=0.0, events=False,
                 timeout=120.0, plan=None):
    cfg = ConfigureRequester(None, "me", k=k, plan=kind, request_timeout=timeout)
    ctx = Context(cfg, Supervisor(floor=0.5), make_allocator("average"))
    ctx.update(devices(*names))
    plan = plan or build_plan(model.layer_specs(), k, kind, model.input_shape)
    return Request("r", plan, image, ctx, Time(t, 1000.0 + t), events=events)


def at(t):
    return Time(t, 1000.0 + t)


def work(actions):
    """(device, job, StageWork) of every chunk delivered."""
    return [(a.device, job, a.msg) for a in actions
            if isinstance(a, Deliver) and isinstance(a.msg, StageWork) for job in a.msg.jobs]


def compute(model, device, job, msg, t=0.0, corrupt=False):
    """The ChunkResult a worker would send for `job`."""
    layers = {l.name: l for l in model.layers}
    needs = job.chunk.run_as(msg.swap is not None)[0]
    inputs = {n: wire.decode(msg.blobs[k]) for n, k in zip(needs, job.blob_keys)}
    y = compute_chunk(layers, msg.stage, job.chunk, inputs)
    payload = wire.encode(y, msg.wire_dtype)
    if corrupt:
        payload = payload[:len(payload) // 2]
    w = 1000.0 + t
    return ChunkResult("r", job.chunk.stage, job.chunk.index, job.attempt, device, payload,
                       w, w, w)


def run_to_end(model, req, actions, t=0.0):
    """Answer every delivered chunk correctly until the request replies."""
    while not req.done:
        pending = work(actions)
        assert pending, actions
        actions = []
        for dev, job, msg in pending:
            t += 0.01
            actions += req.result(compute(model, dev, job, msg, t), at(t))
    return actions


def reply_of(actions):
    (tell,) = [a for a in actions if isinstance(a, Tell) and not isinstance(a.msg, ChunkEvent)]
    return tell.msg


def test_a_request_runs_to_the_exact_logits(model, image):
    req = make_request(model, image)
    first = req.start(at(0))
    assert {d for d, _, _ in work(first)} == {"a", "b"}      # one message per device
    reply = reply_of(run_to_end(model, req, first))
    assert isinstance(reply, InferReply) and req.done
    want = reference.forward(model, image)
    np.testing.assert_allclose(reply.logits, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert all(r.status == "won" and r.reason == "first" for r in reply.records)
    assert reply.stats["plan"] == "layer" and reply.stats["retries"] == 0


def test_the_first_result_wins_and_a_later_attempt_is_late(model, image):
    req = make_request(model, image)
    dev, job, msg = work(req.start(at(0)))[0]
    deadline = req.ledger.index[(0, job.chunk.index, 0)].deadline
    ((dev2, job2, msg2),) = [w for w in work(req.tick(at(deadline + 1e-3)))
                             if w[1].chunk.index == job.chunk.index]
    assert dev2 != dev and job2.attempt == 1
    req.result(compute(model, dev2, job2, msg2), at(deadline + 0.1))
    won = req.ledger.slots[job.chunk.index]
    assert req.result(compute(model, dev, job, msg), at(deadline + 0.2)) == []
    assert req.ledger.slots[job.chunk.index] is won
    assert req.ledger.index[(0, job.chunk.index, 1)].record.status == "won"
    assert req.ledger.index[(0, job.chunk.index, 0)].record.status == "late"
    other = compute(model, dev, job, msg)
    other.device = "stranger"          # not who was asked: ignored
    assert req.result(other, at(0.3)) == []


def test_a_missed_deadline_moves_the_chunk_and_the_late_first_result_still_wins(model, image):
    req = make_request(model, image)
    sent = work(req.start(at(0)))
    dev, job, msg = sent[0]
    att = req.ledger.index[(0, job.chunk.index, 0)]
    assert att.deadline >= 0.5 and att.due <= att.deadline
    assert req.tick(at(att.deadline - 1e-3)) == []
    moved = work(req.tick(at(att.deadline + 1e-3)))
    assert any(j.chunk.index == job.chunk.index and j.attempt == 1 and d != dev
               for d, j, _ in moved)
    assert att.expired and att.record.status == "pending"
    actions = req.result(compute(model, dev, job, msg), at(att.deadline + 0.1))
    cancels = [a for a in actions if isinstance(a, Deliver) and isinstance(a.msg, Cancel)]
    assert cancels and cancels[0].msg.keys == ((0, job.chunk.index),)
    retry = req.ledger.index[(0, job.chunk.index, 1)].record
    assert att.record.status == "won" and retry.status == "cancelled"
    assert retry.reason == "deadline"


def test_a_chunk_every_device_missed_goes_out_again_not_waits_for_ever(model, image):
    """Once every device holds an attempt past its deadline (their workers died with the
    old leader, say) the chunk goes to a device again; it used to wait for late answers
    that never come until the request's timeout."""
    req = make_request(model, image, names=("a",), k=1, kind="single")
    dev, job, _ = work(req.start(at(0)))[0]
    first = req.ledger.index[(0, job.chunk.index, 0)]
    again = work(req.tick(at(first.deadline + 1e-3)))
    assert [(d, j.chunk.index, j.attempt) for d, j, _ in again] == [("a", job.chunk.index, 1)]
    assert first.record.status == "pending"      # a late answer would still win


def _miss_every_attempt(req):
    """Let each attempt at the request's one chunk pass its deadline; returns the time."""
    t = 0.0
    for _ in range(MAX_ATTEMPTS):
        t = max(a.deadline for a in req.ledger.attempts[0]) + 1e-3
        actions = req.tick(at(t))
    return t, actions


def test_a_chunk_missed_on_every_try_fails_the_request_clearly(model, image):
    req = make_request(model, image, names=("a",), k=1, kind="single")
    req.ctx.update(devices("a", incarnation="w1"))
    req.start(at(0))
    _, actions = _miss_every_attempt(req)
    reply = reply_of(actions)
    assert isinstance(reply, InferError) and f"failed {MAX_ATTEMPTS} times (deadline)" in reply.error


def test_while_the_leader_is_sought_a_chunk_waits_for_the_new_workers_and_is_answered(
        model, image):
    """A leader restart replaces every worker: the chunks sent to the old ones meanwhile
    are not the new ones' failures. The chunk waits for the next membership, goes to the
    device's new worker at once and the request is answered."""
    req = make_request(model, image, names=("a",), k=1, kind="single")
    req.ctx.update(devices("a", incarnation="w1"))
    req.start(at(0))
    req.ctx.looking = True
    t, actions = _miss_every_attempt(req)
    assert actions == [] and not req.done
    assert req.ledger.tries(0) == MAX_ATTEMPTS and work(req.tick(at(t + 5))) == []
    req.ctx.update(devices("a", incarnation="w2"))
    assert not req.ctx.looking
    again = req.membership(at(t + 5.1))
    assert [(d, j.attempt) for d, j, _ in work(again)] == [("a", MAX_ATTEMPTS)]
    assert req.ledger.tries(0) == 1
    assert all(a.record.status == "lost" for a in req.ledger.attempts[0][:MAX_ATTEMPTS])
    reply = reply_of(run_to_end(model, req, again, t + 5.1))
    assert isinstance(reply, InferReply)
    np.testing.assert_allclose(reply.logits, reference.forward(model, image), rtol=1e-4,
                               atol=1e-5)


def test_attempts_out_on_a_replaced_worker_go_to_the_new_one_at_once(model, image):
    req = make_request(model, image, names=("a", "b"))
    req.ctx.update(devices("a", "b", incarnation="w1"))
    sent = work(req.start(at(0)))
    on_a = sorted(j.chunk.index for d, j, _ in sent if d == "a")
    req.ctx.update(devices("a", incarnation="w2") + devices("b", incarnation="w1"))
    moved = work(req.membership(at(0.01)))       # long before any deadline
    assert sorted(j.chunk.index for _, j, _ in moved) == on_a
    assert all(req.ledger.index[(0, i, 0)].record.status == "lost" for i in on_a)


def test_a_corrupt_result_is_recomputed_never_merged(model, image):
    req = make_request(model, image, events=True)
    dev, job, msg = work(req.start(at(0)))[0]
    actions = req.result(compute(model, dev, job, msg, corrupt=True), at(0.1))
    rec = req.ledger.index[(0, job.chunk.index, 0)].record
    assert rec.status == "failed" and "corrupt" in rec.reason
    kinds = [a.msg.kind for a in actions if isinstance(a, Tell)]
    assert kinds == ["failed", "reassigned"]
    assert [(j.chunk.index, j.attempt) for _, j, _ in work(actions)] == [(job.chunk.index, 1)]
    assert req.ledger.slots[job.chunk.index] is None


def test_a_chunk_failing_everywhere_fails_the_request(model, image):
    req = make_request(model, image)
    dev, job, msg = work(req.start(at(0)))[0]
    i = job.chunk.index
    for attempt in range(MAX_ATTEMPTS):
        d = req.ledger.index[(0, i, attempt)].record.device
        actions = req.failed(ChunkFailed("r", 0, i, attempt, d, "boom"), at(attempt))
    reply = reply_of(actions)
    assert isinstance(reply, InferError) and "failed 6 times" in reply.error and req.done
    cancelled = {a.device for a in actions if isinstance(a, Deliver)}
    assert cancelled and all(isinstance(a.msg, Cancel) for a in actions
                             if isinstance(a, Deliver))
    assert not any(r.status == "pending" for r in req.ledger.records)


def test_a_lost_connection_resends_elsewhere(model, image):
    req = make_request(model, image)
    sent = work(req.start(at(0)))
    on_a = [j.chunk.index for d, j, _ in sent if d == "a"]
    moved = work(req.connection_lost("a", at(0.1)))
    assert sorted(j.chunk.index for _, j, _ in moved) == sorted(on_a)
    assert all(d == "b" for d, _, _ in moved)
    assert all(req.ledger.index[(0, i, 0)].record.status == "lost" for i in on_a)


def test_chunks_of_an_unusable_device_move_once_late_not_at_once(model, image):
    req = make_request(model, image)
    sent = work(req.start(at(0)))
    held = [req.ledger.index[(0, j.chunk.index, 0)] for d, j, _ in sent if d == "a"]
    req.ctx.update(devices("a", status="unresponsive") + devices("b"))
    assert req.membership(at(0.001)) == []
    due = min(a.due for a in held)
    assert work(req.tick(at(due - 1e-4))) == []
    moved = work(req.tick(at(max(a.due for a in held) + 1e-4)))
    assert {d for d, _, _ in moved} == {"b"} and len(moved) == len(held)
    assert all(req.ledger.index[(0, j.chunk.index, 1)].record.reason == "device-lost"
               for _, j, _ in moved)


def test_a_request_waits_for_devices_and_times_out(model, image):
    req = make_request(model, image, names=(), timeout=10.0)
    assert req.start(at(0)) == [] and req.waiting
    assert req.tick(at(5)) == [] and req.waiting
    reply = reply_of(req.tick(at(10.5)))
    assert isinstance(reply, InferError) and "timed out" in reply.error


def test_a_waiting_request_starts_when_a_device_joins(model, image):
    req = make_request(model, image, names=())
    req.start(at(0))
    req.ctx.update(devices("c"))
    assert {d for d, _, _ in work(req.membership(at(1)))} == {"c"}
    assert not req.waiting


def test_a_local_stage_runs_here_or_goes_out(model, image):
    plan = build_plan(model.layer_specs(), 1, "layer", model.input_shape)
    plan.stages[0] = dataclasses.replace(plan.stages[0], local=True)
    req = make_request(model, image, k=1, plan=plan)
    (local,) = req.start(at(0))
    assert isinstance(local, RunLocal) and local.stage.index == 0
    layers = {l.name: l for l in model.layers}
    y = compute_chunk(layers, local.stage, local.chunk, local.inputs)
    actions = req.local_done(y, at(0.1), at(0.2))
    assert req.stage == 1 and req.ledger.records[0].device == "local:me"
    assert req.ledger.records[0].status == "won" and work(actions)

    req = make_request(model, image, k=1, plan=plan)
    req.start(at(0))
    assert [j.chunk.stage for _, j, _ in work(req.local_failed(at(0.1)))] == [0]


def test_cancel_tells_the_caller_and_the_devices(model, image):
    req = make_request(model, image)
    req.start(at(0))
    actions = req.cancel("stopping")
    assert {a.device for a in actions if isinstance(a, Deliver)} == {"a", "b"}
    assert isinstance(reply_of(actions), InferError) and req.done


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_order_of_results_failures_and_deadlines_gives_the_exact_logits(model, image, data):
    """Whatever happens to the attempts, a request that replies has the exact logits, and
    every chunk it merged won exactly once."""
    kind = data.draw(st.sampled_from(["block", "spatial"]))
    req = make_request(model, image, names=("a", "b", "c"), k=3, kind=kind)
    queue = work(req.start(at(0)))
    t = 0.0
    reply = None
    for _ in range(1000):
        if req.done or not queue:
            break
        t += data.draw(st.floats(0.0, 0.5))
        i = data.draw(st.integers(0, len(queue) - 1))
        dev, job, msg = queue[i]
        what = data.draw(st.sampled_from(["ok"] * 6 + ["fail", "corrupt", "tick", "lost"]))
        if what != "tick":
            queue.pop(i)
        if what in ("ok", "corrupt"):
            actions = req.result(compute(model, dev, job, msg, t, corrupt=what == "corrupt"),
                                 at(t))
        elif what == "fail":
            actions = req.failed(ChunkFailed("r", job.chunk.stage, job.chunk.index,
                                             job.attempt, dev, "boom"), at(t))
        elif what == "lost":
            actions = req.connection_lost(dev, at(t))
        else:
            actions = req.tick(at(t + 10))
        queue += work(actions)
        tells = [a.msg for a in actions if isinstance(a, Tell)]
        if tells:
            reply = tells[-1]
    if isinstance(reply, InferReply):
        want = reference.forward(model, image)
        np.testing.assert_allclose(reply.logits, want, rtol=1e-5,
                                   atol=1e-6 * np.abs(want).max())
        won = [(r.stage, r.chunk) for r in reply.records if r.status == "won"]
        assert len(won) == len(set(won)) == req.plan.num_chunks
    if req.done:
        assert not any(r.status == "pending" for r in req.ledger.records)
        assert not any(d.outstanding for d in req.ctx.sup.devices.values())


def test_auto_sends_whole_requests_while_busy_and_splits_when_idle():
    chooser = PlanChooser(ConfigureRequester(None, "me", plan="auto:whole_above=2"))
    assert chooser.measures_links and chooser.stated_mbit == 0
    assert chooser.choice(3, 2, [1e9]) == ("single", 1, {})
    kind, k, extra = chooser.choice(3, 1, [2e9, 1e9, 0.0], 93.0, True)
    assert (kind, k) == ("auto:whole_above=2", 6)
    assert extra == {"devices": 3, "gmacs": 2.0, "bandwidth_mbit": 90.0, "shared_link": 1}
    stated = PlanChooser(ConfigureRequester(None, "me", plan="auto:bandwidth_mbit=50", k=4))
    assert not stated.measures_links and stated.stated_mbit == 50
    assert stated.choice(2, 0, [], 93.0)[2] == {"devices": 2}
    fixed = PlanChooser(ConfigureRequester(None, "me", plan="layer"))
    assert fixed.choice(2, 5, [1e9]) == ("layer", 4, {}) and not fixed.measures_links
