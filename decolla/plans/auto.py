"""The `auto` planner: a cost model of stage time and a dynamic programme over stage cuts.

Cost model (star network around the requester, full duplex; the arithmetic is
`decolla.cost.layer_seconds` and `decolla.cost.star_stage_seconds`):
  a chunk's input is sent after the previous chunk's (bytes x wire itemsize / 4 / bandwidth
  + a per-message overhead); its device computes it (MACs / MAC/s of each layer kind)
  once the input has arrived and the device is free; results come back one after the
  other on the downlink. A stage's time is when its last result has arrived. With
  ``shared_link=0`` every device has its own link of that bandwidth (the testbed shapes
  device links, not the requester's): transfers to different devices overlap and only
  the per-message overhead is serial at the requester.
  With ``local=True`` a single-chunk stage runs on the requester's own device: no bytes,
  no message overhead (for runtimes that host a worker beside the requester).
The planner cuts the layer list only at clean boundaries (one tensor hands over) and for
each segment tries: one spatial stage with k row strips (k = 1 .. devices; k = 1 keeps
the segment on one device), or, for short segments (<= 4 layers), channel stages of the
`block` plan (partial sums) or of the `fused` plan (gathered input) with k chunks; a
dynamic programme picks the cheapest sequence.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from decolla.cost import (CALL_MACS_PER_WEIGHT, DEFAULT_CORE_SPEED, core_speeds, layer_seconds,
                          star_stage_seconds)
from decolla.plans.data import (ROWWISE, Chunk, Plan, PlanError, Stage, as_spec, split_rows,
                                stage_bytes, tensor_shapes)
from decolla.plans.stages import (Group, channel_groups, clean_cuts, group_stage, spatial_stage,
                                  split_tail, strip_rows)

ITEMSIZE = {"float32": 4, "float16": 2, "int8": 1}   # bytes per value on the wire


@dataclass
class Profile:
    """What the cost model knows about the devices and the network."""
    devices: int = 3
    bandwidth_mbit: float = 100.0
    # per message (send or result), serial at the requester: ≈ 0.3 ms on the data plane
    # (testbed timelines), plus decoding and merging results
    overhead_s: float = 0.001
    # per chunk on its device: receive, decode, encode, send. ≈ 0.46 ms of host CPU on
    # loopback, x 7-8 on a Pi-class core
    device_overhead_s: float = 0.0035
    min_gain: float = 1.1                # split only if predicted >= this much faster than one device
    macs_per_s: dict = field(default_factory=core_speeds)
    wire_dtype: str = "float16"
    compression: float = 1.0             # expected lz4 ratio on the wire (1 = none)
    local: bool = False
    shared_link: bool = True             # False: each device has its own link of that bandwidth
    max_span: int = 40                   # longest segment (layers) tried as one spatial stage
    max_mb: float = 1.0                  # byte budget per inference (wire MB; 0 = none)
    call_macs_per_weight: dict = field(default_factory=lambda: dict(CALL_MACS_PER_WEIGHT))
    # try exchange stages (strips swapping halo rows): off unless asked for. On the testbed
    # they measured no faster than requester stages, and a stalled device stalls its
    # neighbours' strips too (docs/PLANS.md, "Exchange stages")
    exchange: bool = False
    # per halo a strip receives: send, wake-up, decode, and waiting for a neighbour that a
    # CPU quota has just paused (fitted to the testbed: bench.plans_testbed, exchange:every=N)
    halo_overhead_s: float = 0.004

    @classmethod
    def from_options(cls, opts: dict, k: int | None = None) -> "Profile":
        """Profile from plan options (bandwidth_mbit, devices, overhead_ms, gmacs, wire_dtype,
        compression, local); `devices` defaults to `k`."""
        p = cls()
        if k is not None:
            p.devices = int(k)
        for key, val in opts.items():
            if key in ("overhead_ms", "device_overhead_ms", "halo_overhead_ms"):
                setattr(p, key[:-3] + "_s", float(val) / 1e3)
            elif key == "gmacs":          # scale all kinds so pwconv runs at `gmacs` GMAC/s
                f = float(val) * 1e9 / core_speeds()["pwconv"]
                p.macs_per_s = {kk: v * f for kk, v in core_speeds().items()}
            elif key in ("bandwidth_mbit", "compression", "min_gain", "max_mb"):
                setattr(p, key, float(val))
            elif key in ("devices", "max_span"):
                setattr(p, key, int(val))
            elif key in ("local", "shared_link", "exchange"):
                setattr(p, key, str(val).lower() in ("1", "true", "yes"))
            elif key == "whole_above":   # the requester's: whole requests while this many in flight
                continue
            elif key == "wire_dtype":
                if val not in ITEMSIZE:
                    raise PlanError(f"wire_dtype must be one of {sorted(ITEMSIZE)}")
                p.wire_dtype = val
            else:
                raise PlanError(f"unknown auto-plan option {key!r}")
        if p.devices < 1 or p.bandwidth_mbit <= 0:
            raise PlanError("devices must be >= 1 and bandwidth_mbit > 0")
        return p

    def wire_bytes(self, fp32_bytes: float) -> float:
        return fp32_bytes * ITEMSIZE[self.wire_dtype] / 4 / self.compression

    def seconds(self, fp32_bytes: float) -> float:
        return self.wire_bytes(fp32_bytes) * 8 / (self.bandwidth_mbit * 1e6)

    def halo_seconds(self, rows: int, shape) -> float:
        """Receiving one halo of `rows` rows of a tensor of `shape` (H, W, C)."""
        return self.halo_overhead_s + self.seconds(4 * rows * shape[1] * shape[2])


def chunk_seconds(stage: Stage, chunk: Chunk, specs: dict, prof: Profile) -> float:
    """Predicted compute time of one chunk on one device (a strip of an exchange stage: its
    own rows, plus receiving its halos)."""
    t = 0.0
    rows = chunk.layer_rows
    if stage.exchange:
        rows = chunk.swap.own_rows
        for j, m, lo, hi in chunk.swap.halo_in:
            t += prof.halo_seconds(hi - lo, specs[stage.layers[j]]["in_shape"])
    for j, name in enumerate(stage.layers):
        s = specs[name]
        if stage.split == "spatial":
            a, b = rows[j]
            if s["kind"] in ROWWISE:
                frac = (b - a) / s["out_shape"][0]
            elif s["kind"] == "gap" and stage.reduce == "sum":
                frac = (b - a) / s["in_shape"][0]
            else:
                frac = 1.0
        else:                  # a channel chunk: its share of the first layer's outputs
            frac = (chunk.c1 - chunk.c0) / specs[stage.layers[0]]["out_shape"][-1]
        # a strip calls the kernel with the whole weight, a channel chunk with its slice
        t += layer_seconds(s, frac, prof.macs_per_s, prof.call_macs_per_weight,
                           whole_weights=stage.split == "spatial")
    return t


def stage_seconds(stage: Stage, specs: dict, prof: Profile) -> float:
    """Predicted wall time of a stage (see the module docstring)."""
    comps = [chunk_seconds(stage, c, specs, prof) for c in stage.chunks]
    if len(stage.chunks) == 1 and (prof.local or stage.local):
        return comps[0]
    costs = [c.run_as(stage.exchange)[1] for c in stage.chunks]
    # exchange strips advance in lockstep: all end with the slowest
    return star_stage_seconds(comps, costs, prof.devices, prof.seconds, prof.overhead_s,
                              prof.device_overhead_s, prof.shared_link, lockstep=stage.exchange)


def swap_points(seg: list[dict], k: int, prof: Profile, memo: dict | None = None) -> tuple:
    """Where the k strips of an exchange stage over `seg` should swap halos: layer indices
    (clean cuts: one narrow tensor hands over) chosen by a dynamic programme that adds, per
    stretch between two swaps, the slowest strip's compute (its halos recomputed inside the
    stretch) and the swap's cost (`halo_overhead_s` per side + the rows' bytes)."""
    body = split_tail(seg)[0]
    n = len(body)
    if n == 0:
        return ()
    memo = {} if memo is None else memo
    points = [0] + [c for c in clean_cuts(body) if 0 < c < n] + [n]
    best: dict = {0: (0.0, ())}
    for b in points[1:]:
        options = []
        for a in points:
            if a >= b:
                break
            key = (body[a]["name"], body[b - 1]["name"], k, a > 0)
            if key not in memo:
                memo[key] = _stretch_seconds(body[a:b], k, prof, swapped=a > 0)
            options.append((best[a][0] + memo[key], best[a][1] + ((a,) if a else ())))
        best[b] = min(options)
    return best[n][1]


def _stretch_seconds(layers: list[dict], k: int, prof: Profile, swapped: bool) -> float:
    """The slowest of k strips over `layers` (halos recomputed inside), plus fetching the
    rows of its input it does not own when `swapped`."""
    height = layers[-1]["out_shape"][0]
    in_shape = layers[0]["in_shape"]
    owned = split_rows(in_shape[0], k)
    worst = 0.0
    for i, (r0, r1) in enumerate(split_rows(height, k)):
        rows, need = strip_rows(layers, r0, r1, "<in>")
        t = sum(s["macs"] * (b - a) / s["out_shape"][0] /
                prof.macs_per_s.get(s["kind"], DEFAULT_CORE_SPEED)
                for s, (a, b) in zip(layers, rows))
        if swapped:
            lo, hi = need["<in>"]
            a, b = owned[min(i, len(owned) - 1)]
            for extra in (max(0, a - lo), max(0, hi - b)):
                if extra:
                    t += prof.halo_seconds(extra, in_shape)
        worst = max(worst, t)
    return worst


def _candidates(seg: list[dict], prof: Profile, single_block: bool, long: bool = False,
                memo: dict | None = None, last: bool = False):
    """(label, groups) options for one segment of layers (a `long` one: exchange stages only;
    exchange stages only as the `last` segment, which keeps planning to about a second)."""
    strips = split_tail(seg) is not None
    if strips and prof.exchange and prof.devices > 1 and last:
        # all devices only (fewer strips than devices rarely pay and double planning time)
        at = swap_points(seg, prof.devices, prof, memo)
        yield f"exchange x{prof.devices} ({len(at)} swaps)", \
            [Group(seg, "spatial", prof.devices, swap_at=at)]
    if long:
        return
    yield "one device", [Group(seg, "spatial", 1)]
    if strips:
        for k in range(2, prof.devices + 1):
            yield f"spatial x{k}", [Group(seg, "spatial", k)]
    if single_block:
        for k in range(2, prof.devices + 1):
            yield f"block x{k}", channel_groups(seg, "block", k)
            yield f"gather x{k}", channel_groups(seg, "fused", k)


def _cheapest(specs: list[dict], prof: Profile, by_name: dict, shapes: dict, memo: dict,
              price: float) -> tuple:
    """(predicted seconds, groups, notes) of the plan minimising predicted seconds plus
    `price` per wire byte: a dynamic programme over the clean cuts."""
    cuts = [0] + clean_cuts(specs)
    if cuts[-1] != len(specs):
        cuts.append(len(specs))
    best = {0: (0.0, 0.0, [], [])}     # cut position -> (objective, seconds, groups, notes)
    for j in range(1, len(cuts)):
        end = cuts[j]
        options = []
        for i in range(j - 1, -1, -1):
            start = cuts[i]
            last = end == len(specs)
            long = end - start > prof.max_span and i < j - 1
            if long and not (prof.exchange and last):
                break
            seg = specs[start:end]
            prev = specs[start - 1]["name"] if start else "input"
            base_o, base_t, base_g, base_n = best[start]
            for label, groups in _candidates(seg, prof, len(seg) <= 4, long, memo, last):
                t, o, notes, p = 0.0, 0.0, [], prev
                for g in groups:
                    st = group_stage(g, 0, p, shapes)
                    if g.swap_at is not None and not st.exchange:
                        break              # some layer too short to give every strip rows
                    ts = stage_seconds(st, by_name, prof)
                    nbytes = prof.wire_bytes(stage_bytes(st))
                    t, o = t + ts, o + ts + price * nbytes
                    notes.append({"layers": [s["name"] for s in g.layers], "choice": label,
                                  "split": st.split, "chunks": len(st.chunks),
                                  "bytes": nbytes, "seconds": ts})
                    p = st.output
                else:
                    options.append((base_o + o, base_t + t, base_g + groups, base_n + notes))
        best[end] = min(options, key=lambda opt: opt[0])
    return best[len(specs)][1:]


def plan_groups(specs: list[dict], k: int, opts: dict):
    """Groups of the cheapest plan under the cost model, and notes explaining it."""
    prof = Profile.from_options(opts, k)
    prof.devices = max(1, min(prof.devices, k))      # never more chunks per stage than k
    by_name = {s["name"]: s for s in specs}
    shapes = tensor_shapes(specs)
    memo: dict = {}                    # swap_points' stretch costs, shared by all runs
    t, groups, notes = _cheapest(specs, prof, by_name, shapes, memo, 0.0)
    # Over the byte budget: price every byte (first at the time it takes on the link, then
    # 4x, 16x, ...) and plan again; one device if no price brings it under.
    budget, price = prof.max_mb * 1e6, 8 / (prof.bandwidth_mbit * 1e6)
    for _ in range(5):
        if budget <= 0 or sum(n["bytes"] for n in notes) <= budget:
            break
        t, groups, notes = _cheapest(specs, prof, by_name, shapes, memo, price)
        price *= 4
    single = Group(specs, "spatial", 1)
    single_stage = group_stage(single, 0, "input", shapes)
    one_s = stage_seconds(single_stage, by_name, prof)
    prof_local = Profile(**{**asdict(prof), "local": True})
    notes_out = {"profile": asdict(prof), "predicted_s": t, "stages": notes,
                 "one_device_s": stage_seconds(single_stage, by_name, prof_local)}
    over = 0 < budget < sum(n["bytes"] for n in notes)
    if over or t * prof.min_gain > one_s:
        # The prediction's error is of the order of the gain: one device is the safe choice.
        why = f"over {prof.max_mb:g} MB" if over else f"split gain < {prof.min_gain:g}x"
        groups = [single]
        notes_out.update(predicted_s=one_s, stages=[{
            "layers": [s["name"] for s in specs], "choice": f"one device ({why})",
            "split": "spatial", "chunks": 1, "seconds": one_s,
            "bytes": prof.wire_bytes(stage_bytes(single_stage))}])
    groups = _merge_singles(groups)
    if prof.local:
        for g in groups:
            g.local = g.k == 1
    return groups, notes_out


def _merge_singles(groups: list) -> list:
    """Adjacent one-device stages become one (one round trip instead of several)."""
    out: list = []
    for g in groups:
        if out and g.split == "spatial" and g.k == 1 and out[-1].split == "spatial" \
                and out[-1].k == 1:
            out[-1] = Group(out[-1].layers + g.layers, "spatial", 1)
        else:
            out.append(g)
    return out


def _ops(stage: Stage, by_name: dict) -> str:
    """'; ops conv 7x7/2, add x2, ...': the operators inside a stage's imported graph
    segments (their kernels and strides), or '' when it has none."""
    count: dict[str, int] = {}
    for name in stage.layers:
        for n in by_name[name].get("nodes", ()):
            a = n["attrs"]
            label = n["op"] + (f" {a['kernel'][0]}x{a['kernel'][1]}/{a['stride'][0]}"
                               if "kernel" in a else "")
            count[label] = count.get(label, 0) + 1
    return "; ops " + ", ".join(k + (f" x{v}" if v > 1 else "") for k, v in count.items()) \
        if count else ""


def explain(plan: Plan, specs, prof: Profile | None = None) -> str:
    """Human-readable table of a plan's stages: layers, split, chunks, bytes, predicted time."""
    specs = [as_spec(s) for s in specs]
    by_name = {s["name"]: s for s in specs}
    if prof is None:
        prof = Profile.from_options({k: v for k, v in plan.notes.get("profile", {}).items()
                                     if k in ("devices", "bandwidth_mbit", "wire_dtype")})
    lines = [f"plan {plan.name}: {len(plan.stages)} stages, {plan.num_chunks} chunks; "
             f"{prof.devices} devices at {prof.macs_per_s['pwconv'] / 1e9:.3g} GMAC/s "
             f"(pointwise; other layer kinds in proportion), {prof.bandwidth_mbit:g} Mb/s "
             f"({'one shared link' if prof.shared_link else 'per device link'}), "
             f"wire {prof.wire_dtype}, {prof.overhead_s * 1e3:g} ms/message, "
             f"{prof.device_overhead_s * 1e3:g} ms/chunk on its device",
             f"{'#':>3} {'split':11} {'k':>2} {'bytes':>10} {'pred ms':>8}  layers"]
    total_t = total_b = 0.0
    for st in plan.stages:
        on_requester = len(st.chunks) == 1 and (prof.local or st.local)
        b = 0.0 if on_requester else prof.wire_bytes(stage_bytes(st))
        t = stage_seconds(st, by_name, prof)
        total_t += t
        total_b += b
        names = st.layers if len(st.layers) <= 3 else (st.layers[0], "...", st.layers[-1])
        split = ("exchange" if st.exchange else st.split) + ("+sum" if st.reduce == "sum" else "")
        lines.append(f"{st.index:>3} {split:11} {len(st.chunks):>2} {b:>10,.0f} {t * 1e3:>8.1f}  "
                     f"{' '.join(names)} ({len(st.layers)} layers{_ops(st, by_name)})")
    single = spatial_stage(0, specs, 1, "input", tensor_shapes(specs, plan.input_shape))
    remote = stage_seconds(single, by_name, Profile(**{**asdict(prof), "local": False}))
    # the requester's own device is an alternative only when the plan may use it: printing
    # it otherwise showed a cheaper plan than the one chosen
    local = (f", {stage_seconds(single, by_name, prof) * 1e3:.1f} ms on the requester itself"
             if prof.local else "")
    lines.append(f"total: {total_b / 1e6:.3f} MB on the wire (uncompressed), predicted "
                 f"{total_t * 1e3:.1f} ms; the whole network on one device: {remote * 1e3:.1f} ms "
                 f"with the image sent there (speed-up {remote / max(total_t, 1e-9):.2f}x)"
                 + local)
    if not prof.local:
        lines.append("the requester computes no stage itself (--local, or auto:local=1, "
                     "lets it keep one-device stages)")
    return "\n".join(lines)
