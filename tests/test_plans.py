"""Plans of issue 6 in one process: spatial strips, partial-sum blocks, auto, wire encodings.

Every plan x encoding is run as the cluster would run it (`decolla.plans.run`: each chunk's
input slices and result go through the wire codec) and compared with the reference.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from decolla import reference
from decolla.loader import load_model
from decolla.plans import PLANS, PlanError, build_plan, parse_plan_name
from decolla.plans.auto import Profile, chunk_seconds, explain
from decolla.plans.compute import chunk_output_shape, strip_buffers
from decolla.plans.run import run_plan
from decolla.plans.stages import rows_needed, spatial_stage
from decolla.runtime import wire

SPECS = {"v2": "mobilenet_v2:width=0.35,input_size=96,num_classes=10,seed=0",
         "v1": "mobilenet_v1:width=0.25,input_size=96,num_classes=10,seed=0"}
# max |logit error| / max |logit| allowed per wire encoding (see docs/PLANS.md)
BOUNDS = {"float32": 1e-5, "float16": 1e-2, "int8": 0.25}
_cache = {}


def model(arch):
    if arch not in _cache:
        m = load_model(SPECS[arch])
        img = np.random.default_rng(7).standard_normal(m.input_shape).astype(np.float32)
        _cache[arch] = (m, img, reference.forward(m, img))
    return _cache[arch]


def rel(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("kind", PLANS)
@pytest.mark.parametrize("arch", ["v2", "v1"])
def test_every_plan_and_encoding_reproduces_the_reference(arch, kind):
    m, img, want = model(arch)
    plan = build_plan(m.layer_specs(), 3, kind + (":bandwidth_mbit=1000" if kind == "auto" else ""))
    for dtype, bound in BOUNDS.items():
        got, stats = run_plan(m, plan, img, dtype)
        assert rel(got, want) <= bound, (kind, dtype)
        assert stats.total > 0


def test_spatial_plan_has_row_strips_merged_along_rows():
    m, img, want = model("v2")
    plan = build_plan(m.layer_specs(), 4, "spatial")
    head = plan.stages[0]
    assert head.split == "spatial" and head.axis == 0 and len(head.chunks) == 4
    rows = [c.rows for c in head.chunks]
    assert rows[0][0] == 0 and rows[-1][1] == head.out_shape[0]
    assert all(rows[i][1] == rows[i + 1][0] for i in range(len(rows) - 1))
    # strips read overlapping input rows (the halo), never the whole image
    need_rows = [c.needs[0].rows for c in head.chunks]
    assert all(need_rows[i][1] > need_rows[i + 1][0] for i in range(len(rows) - 1))
    assert all(hi - lo < m.input_shape[0] for lo, hi in need_rows)
    assert any(m.layer(n).residual for n in head.layers)      # residual adds inside the strip


def test_block_plan_reduces_partial_sums_and_moves_fewer_bytes():
    m = load_model("mobilenet_v2:input_size=96,width=0.5")
    specs = m.layer_specs()
    b = {k: build_plan(specs, 3, k).bytes_moved() for k in PLANS if k != "auto"}
    assert b["block"] < b["block-gather"] < b["layer"]
    assert b["spatial"] < b["block"]
    plan = build_plan(specs, 3, "block")
    sums = [s for s in plan.stages if s.reduce == "sum"]
    assert sums and all(s.layers[-1].endswith("project") for s in sums)
    assert all(chunk_output_shape(s, c) == s.out_shape for s in sums for c in s.chunks)
    v1 = build_plan(load_model(SPECS["v1"]).layer_specs(), 3, "block")
    assert any(s.reduce == "sum" and s.relu6 for s in v1.stages)   # dw + pw, ReLU6 after the sum


@given(size=st.integers(96, 256), k=st.integers(1, 8), until=st.sampled_from([7, 14, 28, 56]),
       arch=st.sampled_from(["mobilenet_v2", "mobilenet_v1"]))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_spatial_halos_any_size_and_strip_count(size, k, until, arch):
    m = load_model(f"{arch}:width=0.25,input_size={size},num_classes=8,seed=2")
    img = np.random.default_rng(size).standard_normal(m.input_shape).astype(np.float32)
    want, tensors = reference.forward(m, img, keep=True)
    plan = build_plan(m.layer_specs(), k, f"spatial:spatial_until={until}")
    got, _, mine = run_plan(m, plan, img, None, keep=True)
    head = plan.stages[0]
    assert head.split == "spatial"
    ref_head = tensors[head.output]
    np.testing.assert_allclose(mine[head.output], ref_head, rtol=1e-4,
                               atol=1e-5 * max(1.0, float(np.abs(ref_head).max())))
    assert rel(got, want) <= 1e-5


@given(devices=st.integers(1, 5), bw=st.sampled_from([1, 10, 100, 1000]), shared=st.booleans())
@settings(max_examples=8, deadline=None)
def test_auto_plan_is_correct_and_never_uses_more_chunks_than_devices(devices, bw, shared):
    m, img, want = model("v2")
    plan = build_plan(m.layer_specs(), 8, f"auto:bandwidth_mbit={bw},devices={devices},"
                                                  f"shared_link={int(shared)}")
    assert max(len(s.chunks) for s in plan.stages) <= devices
    got, _ = run_plan(m, plan, img, "float32")
    assert rel(got, want) <= 1e-5
    assert plan.notes["predicted_s"] > 0


def test_auto_keeps_one_device_when_the_network_is_slow_and_splits_when_fast():
    specs = load_model("mobilenet_v2").layer_specs()
    slow = build_plan(specs, 3, "auto:bandwidth_mbit=1,local=1")
    assert len(slow.stages) == 1 and len(slow.stages[0].chunks) == 1
    fast = build_plan(specs, 3, "auto:bandwidth_mbit=1000")
    assert max(len(s.chunks) for s in fast.stages) > 1
    assert fast.notes["predicted_s"] < fast.notes["one_device_s"]
    text = explain(fast, specs, Profile(devices=3, bandwidth_mbit=1000))
    assert "predicted" in text and f"{len(fast.stages)} stages" in text


def test_auto_splits_only_for_a_predicted_gain():
    specs = load_model("mobilenet_v2").layer_specs()

    def chunks(opts):
        return [len(s.chunks) for s in build_plan(specs, 3, "auto:" + opts).stages]
    assert chunks("bandwidth_mbit=1000,device_overhead_ms=0") != [1]
    assert chunks("bandwidth_mbit=1000,device_overhead_ms=0,min_gain=100") == [1]
    # strips that swap halos pay the per-chunk cost once per device, like one device does;
    # halos that cost too much keep the whole network on one device too
    assert chunks("bandwidth_mbit=1000,device_overhead_ms=500") == [1]
    assert chunks("bandwidth_mbit=1000,exchange=1,halo_overhead_ms=100,device_overhead_ms=500") == [1]
    assert chunks("bandwidth_mbit=1000,exchange=1,device_overhead_ms=500") == [3]
    kept = build_plan(specs, 3, "auto:bandwidth_mbit=1000,min_gain=100")
    assert kept.notes["stages"][0]["choice"].startswith("one device")


def test_plan_options_are_parsed_and_checked():
    assert parse_plan_name("auto:bandwidth_mbit=2.5,devices=3") == \
        ("auto", {"bandwidth_mbit": 2.5, "devices": 3})
    specs = model("v2")[0].layer_specs()
    with pytest.raises(PlanError):
        build_plan(specs, 3, "auto:warp=9")
    with pytest.raises(PlanError):
        build_plan(specs, 3, "auto:bandwidth_mbit")


def test_cli_plan_explain(capsys):
    from decolla import cli
    # the handler itself: cli.main would point the process's logging at capsys's stream
    args = cli.build_parser().parse_args(["plan", "--explain", "--model", SPECS["v2"],
                                          "--devices", "3", "--bandwidth-mbit", "100"])
    assert cli._plan(args) == 0
    out = capsys.readouterr().out
    assert "plan auto" in out and "MB on the wire" in out
    args = cli.build_parser().parse_args(["plan", "--model", SPECS["v2"], "--overhead-ms", "7",
                                          "--plan", "auto:overhead_ms=0,device_overhead_ms=1"])
    assert cli._plan(args) == 0
    out = capsys.readouterr().out      # the plan name's options win over the flags
    assert "0 ms/message, 1 ms/chunk on its device" in out


# --------------------------------------------------------------------------- int8 wire

@given(data=st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=300))
def test_int8_error_is_at_most_half_a_step(data):
    x = np.asarray(data, np.float32)
    y = wire.decode(wire.encode(x, "int8"))
    step = (float(x.max()) - float(x.min())) / 255
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(y - x).max() <= step / 2 + 1e-6 * max(1.0, float(np.abs(x).max()))


def test_int8_special_cases_and_size():
    assert np.array_equal(wire.decode(wire.encode(np.full((3, 4), 2.5, np.float32), "int8")),
                          np.full((3, 4), 2.5, np.float32))
    assert wire.decode(wire.encode(np.zeros((0, 5), np.float32), "int8")).shape == (0, 5)
    x = np.random.default_rng(0).standard_normal((40, 40, 8)).astype(np.float32)
    assert len(wire.encode(x, "int8", compress=False)) < len(wire.encode(x, "float32")) / 3.9
    blob = bytearray(wire.encode(x, "int8"))
    blob[20] ^= 1
    with pytest.raises(wire.WireError):
        wire.decode(bytes(blob))
    with pytest.raises(ValueError):
        wire.encode(np.array([np.nan], np.float32), "int8")


# --------------------------------------------------------------------------- recovery

RECOVERY_SPEC = "mobilenet_v2:width=0.35,input_size=32,num_classes=10,seed=0"


# auto with free messages: on this tiny model it would otherwise (rightly) not split at all
@pytest.mark.parametrize("kind", ["layer", "block", "spatial", "auto:bandwidth_mbit=1000,"
                                  "overhead_ms=0,device_overhead_ms=0,min_gain=1"])
def test_lost_chunk_is_recomputed_in_every_plan(asys, kind):
    """Real Requester + Workers (in-process actor system): the first attempt at chunk 0 of
    every stage is damaged, whichever worker the plan gives it to; it is recomputed and
    the logits stay right."""
    from decolla.runtime.messages import InferReply, InferRequest
    from tests.inprocess import CorruptingWorker, start_requester
    m = load_model(RECOVERY_SPEC)
    req = start_requester(asys, m, RECOVERY_SPEC, [CorruptingWorker] * 2, k=2, plan=kind,
                          wire_dtype="float16")
    img = np.random.default_rng(0).standard_normal(m.input_shape).astype(np.float32)
    reply = asys.ask(req, InferRequest("r1", img), 60)
    assert isinstance(reply, InferReply), reply
    assert rel(reply.logits, reference.forward(m, img)) <= BOUNDS["float16"]
    damaged = [r for r in reply.records if r.chunk == 0 and r.attempt == 0]
    assert damaged, "no chunk was damaged: the test did not exercise recovery"
    # a damaged result never wins: it is judged corrupt (failed) or, where a duplicate
    # attempt won first (a deadline's re-send), arrives late
    assert all(r.status != "won" for r in damaged), [(r.stage, r.status) for r in damaged]
    for r in [r for r in reply.records if r.status == "failed"]:
        assert any(o.status == "won" and (o.stage, o.chunk) == (r.stage, r.chunk)
                   and o.attempt > r.attempt for o in reply.records)


def test_local_stage_runs_on_the_requester_without_moving_bytes(asys):
    """auto with local=1 on a slow network: one stage, computed by the requester itself."""
    from decolla.actors.worker import Worker
    from decolla.runtime.messages import InferReply, InferRequest
    from tests.inprocess import start_requester
    m = load_model(RECOVERY_SPEC)
    req = start_requester(asys, m, RECOVERY_SPEC, [Worker], node="me", k=3,
                          plan="auto:bandwidth_mbit=1,local=1")
    img = np.random.default_rng(4).standard_normal(m.input_shape).astype(np.float32)
    reply = asys.ask(req, InferRequest("r1", img), 60)
    assert isinstance(reply, InferReply), reply
    assert rel(reply.logits, reference.forward(m, img)) <= 1e-5
    assert reply.records and all(r.device == "local:me" and r.bytes_in == 0
                                 for r in reply.records)


@given(kind=st.sampled_from(["conv3x3", "dwconv3x3", "pwconv"]), stride=st.sampled_from([1, 2]),
       h=st.integers(1, 300), data=st.data())
def test_planner_row_arithmetic_equals_the_kernels_own(kind, stride, h, data):
    from decolla.ops import input_rows_needed
    stride = 1 if kind == "pwconv" else stride
    out_h = (h - 1) // stride + 1
    r0 = data.draw(st.integers(0, out_h - 1))
    r1 = data.draw(st.integers(r0 + 1, out_h))
    assert rows_needed(kind, stride, r0, r1, h) == input_rows_needed(kind, stride, r0, r1, h)


def test_auto_keeps_to_its_byte_budget():
    specs = load_model("mobilenet_v2").layer_specs()
    opts = "auto:bandwidth_mbit=1000,shared_link=0,exchange=0,min_gain=1"
    free = build_plan(specs, 3, opts + ",max_mb=0")
    assert free.bytes_moved(2) > 0.35e6
    kept = build_plan(specs, 3, opts + ",max_mb=0.35")
    assert kept.bytes_moved(2) <= 0.35e6
    assert kept.notes["predicted_s"] >= free.notes["predicted_s"]
    none = build_plan(specs, 3, opts + ",max_mb=0.1")      # less than the image
    assert [len(s.chunks) for s in none.stages] == [1]
    assert "over 0.1 MB" in none.notes["stages"][0]["choice"]


def test_cost_model_charges_every_strip_the_kernel_calls_fixed_cost():
    specs = load_model("mobilenet_v2").layer_specs()
    tail = [s for s in specs if s["name"].startswith(("b16", "b17"))]   # 7x7 blocks
    by = {s["name"]: s for s in tail}
    shapes = {"in": tuple(tail[0]["in_shape"])} | {s["name"]: tuple(s["out_shape"]) for s in specs}
    whole = spatial_stage(0, tail, 1, "in", shapes)
    strips = spatial_stage(0, tail, 7, "in", shapes)

    def seconds(prof):
        return (chunk_seconds(whole, whole.chunks[0], by, prof),
                sum(chunk_seconds(strips, c, by, prof) for c in strips.chunks))
    (one, seven), (one_free, seven_free) = seconds(Profile()), \
        seconds(Profile(call_macs_per_weight={}))
    assert one > one_free
    # 7 one-row strips make 7 calls per layer: 7 times the fixed cost of one whole call
    assert seven - seven_free == pytest.approx(7 * (one - one_free))


def test_strips_share_a_few_buffers_and_reuse_them_across_requests():
    m, img, want = model("v2")
    plan = build_plan(m.layer_specs(), 3, "spatial")
    cache: dict = {}
    other = np.random.default_rng(8).standard_normal(m.input_shape).astype(np.float32)
    for x, ref in ((img, want), (other, reference.forward(m, other)), (img, want)):
        got, _ = run_plan(m, plan, x, None, cache=cache)
        assert rel(got, ref) <= 1e-5
    layers = {l.name: l for l in m.layers}
    stage = plan.stages[0]
    outs = strip_buffers(layers, stage.layers, stage.chunks[1].layer_rows, cache)
    bases = {id(o.base) for o in outs if o is not None}
    assert len(stage.layers) > 3 * len(bases) and outs[-1] is None
