"""The named plans and `build_plan`, which turns layer specs into a `Plan`.

Plans (``PLANS``):
  ``layer``         the paper's plan: one stage per layer, output channels split into K chunks.
  ``fused``         channel-wise layers (depthwise, global pool) fuse into their producer's
                    stage: the intermediate tensor never travels.
  ``block-gather``  the same stages as ``fused`` (expand + depthwise per channel chunk, then
                    the projection split by output channels over the gathered input).
  ``block``         expand + depthwise + projection in one stage per block: a chunk of the
                    expanded channels computes the projection's *partial sum* over its
                    channels; the requester adds the K partial sums (split='channel',
                    reduce='sum'). MobileNetV1's depthwise + pointwise likewise.
  ``spatial``       the high-resolution prefix (outputs taller than `spatial_until` rows,
                    default 28 rows at 224 px) as one stage of output-row strips with halos
                    carried through all its layers (split='spatial', merged along axis 0),
                    the rest as ``block`` stages; ``spatial:exchange=N`` makes that stage
                    an exchange stage swapping every N 3x3 layers (below).
  ``exchange``      the whole network as one stage of row strips that swap halo rows with
                    each other layer by layer (`Swap`, `decolla.plans.exchange`) instead of
                    recomputing them (``exchange:every=N``: every N 3x3 layers, recomputing
                    in between); a strip sent alone (a retry) recomputes all its halos.
  ``auto``          chosen per segment by the cost model of `decolla.plans.auto`.
  ``single``        the whole network as one chunk on one device (mobile-only through
                    the runtime: the image goes to one device, the logits come back).
A plan name may carry options: ``"auto:bandwidth_mbit=100,devices=3"``,
``"spatial:spatial_until=14"``. With ``auto:...,local=1`` the one-chunk stages the planner
keeps on one device are marked `Stage.local`: the requester computes them itself when it
can load the model (no bytes on the network), else sends them to a worker as usual.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from decolla.plans.auto import plan_groups
from decolla.plans.data import ROWWISE, Plan, PlanError, Stage, as_spec, tensor_shapes
from decolla.plans.stages import Group, channel_groups, clean_cuts, group_stage

PLANS = ("layer", "fused", "block", "block-gather", "spatial", "exchange", "auto", "single")


def parse_plan_name(kind: str) -> tuple[str, dict]:
    """'auto:bandwidth_mbit=100,devices=3' -> ('auto', {'bandwidth_mbit': 100.0, 'devices': 3})."""
    name, _, rest = str(kind).partition(":")
    opts: dict = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise PlanError(f"plan option {item!r} is not KEY=VALUE")
        try:
            num = float(val)
            opts[key.strip()] = int(num) if num.is_integer() and "." not in val else num
        except ValueError:
            opts[key.strip()] = val.strip()
    return name, opts


def spatial_prefix(specs: list[dict], until: int) -> int:
    """Number of leading layers the `spatial` plan strips: through the first clean cut whose
    output is at most `until` rows tall, choosing among the cuts at that height the one
    handing over the smallest tensor (a block output, not an expanded one)."""
    best, height = 0, None
    for n in clean_cuts(specs):
        if any(s["kind"] not in ROWWISE for s in specs[:n]):
            break
        shape = specs[n - 1]["out_shape"]
        if height is not None and shape[0] != height:
            break
        if height is None and shape[0] > until:
            best = n
            continue
        height = shape[0]
        size = int(np.prod(shape))
        if best == 0 or specs[best - 1]["out_shape"][0] != height or \
                size < int(np.prod(specs[best - 1]["out_shape"])):
            best = n
    return best


def _every(opts: dict, key: str, default: int) -> int:
    try:
        every = int(opts.get(key, default))
    except (TypeError, ValueError):
        every = -1
    if every < 0:
        raise PlanError(f"plan option {key} must be a whole number >= 0, got {opts.get(key)!r}")
    return every


def build_groups(specs: list[dict], k: int, kind: str, opts: dict) -> tuple[list[Group], dict]:
    """The groups (future stages) of plan `kind`, and the planner's notes (`auto` only)."""
    if kind in ("layer", "fused", "block-gather", "block"):
        base = "fused" if kind == "block-gather" else kind
        return channel_groups(specs, base, k), {}
    if kind == "spatial":
        until = int(opts.get("spatial_until", max(1, round(specs[0]["in_shape"][0] / 8))))
        n = spatial_prefix(specs, until)
        head = [Group(specs[:n], "spatial", k, swap_every=_every(opts, "exchange", 0))] if n else []
        return head + channel_groups(specs[n:], "block", k), {}
    if kind == "exchange":
        return [Group(specs, "spatial", k, swap_every=_every(opts, "every", 1))], {}
    if kind == "single":
        return [Group(specs, "spatial", 1)], {}
    if kind == "auto":
        return plan_groups(specs, k, opts)
    raise PlanError(f"unknown plan {kind!r}; choose from {PLANS}")


def build_plan(specs: Sequence, k: int, kind: str = "layer", input_shape=None,
               min_chunk_macs: int = 0, **options) -> Plan:
    """Plan for layer specs (dicts from `Model.layer_specs()` or Layer objects).

    `k` chunks per stage (capped by the channel/row count, and by `min_chunk_macs`
    when given, so tiny stages are not cut into pieces smaller than that). `kind` is
    a plan name from PLANS, optionally with options (see the module docstring);
    keyword `options` are merged over those.
    """
    name, opts = parse_plan_name(kind)
    opts.update(options)
    if name not in PLANS:
        raise PlanError(f"unknown plan {kind!r}; choose from {PLANS}")
    if k < 1:
        raise PlanError(f"k must be >= 1, got {k}")
    specs = [as_spec(s) for s in specs]
    if not specs:
        raise PlanError("model has no layers")
    shapes = tensor_shapes(specs, input_shape)
    groups, notes = build_groups(specs, k, name, opts)
    stages: list[Stage] = []
    last_use: dict[str, int] = {}
    prev = "input"
    for si, g in enumerate(groups):
        k_eff = g.k
        if min_chunk_macs > 0:
            macs = sum(int(s["macs"]) for s in g.layers)
            k_eff = max(1, min(k_eff, macs // max(1, min_chunk_macs)))
        stage = group_stage(g, si, prev, shapes, k_eff)
        if g.local and len(stage.chunks) == 1:
            stage = replace(stage, local=True)
        for c in stage.chunks:
            for n in c.needs:
                last_use[n.tensor] = si
        stages.append(stage)
        prev = stage.output
    return Plan(kind, shapes["input"], stages, last_use, notes)
