"""Random training/evaluation scenarios: devices, network and stages of a model.

A scenario is fully determined by its integer seed. Training draws seeds below
HELDOUT_BASE; held-out evaluation uses HELDOUT_BASE + i, never seen in training.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from decolla import model
from decolla.cost import KIND_SPEED, KINDS

HELDOUT_BASE = 1_000_000_000
MBIT = 1e6 / 8  # bytes/s in one Mb/s


@dataclass(frozen=True)
class ScenarioConfig:
    """Ranges the scenario generator samples from."""
    k: int = 6
    min_devices: int = 1
    max_devices: int = 6
    stages: int = 16                       # consecutive layers per episode
    models: tuple = (("v2", 1.0, 224), ("v2", 0.5, 160), ("v1", 1.0, 224), ("v1", 0.5, 128))
    speed_range: tuple = (0.3e9, 3e9)      # pwconv MAC/s at full availability
    bandwidth_mbit: tuple = (2.0, 200.0)
    latency_s: tuple = (0.0002, 0.005)
    p_local: float = 0.5                   # device 0 is the requester itself (no transfers)
    p_uplink: float = 0.5                  # requester uplink is a shared bottleneck
    uplink_mbit: tuple = (10.0, 200.0)
    foreign_rate: tuple = (0.0, 8.0)       # other requests' chunks arriving per second per device
    foreign_size_s: float = 0.02           # mean seconds of such a chunk at full speed
    load_vol: tuple = (0.0, 0.4)           # OU volatility of availability
    load_tau_s: tuple = (0.05, 1.0)        # OU time constant
    report_period_s: tuple = (0.05, 0.5)   # how often a device's load report refreshes
    fail_prob: float = 0.01                # per stage per device


@functools.lru_cache(maxsize=None)
def model_layers(arch: str, width: float, input_size: int) -> tuple:
    """Layer specs of a MobileNet from decolla.model (cached)."""
    build = {"v1": model.mobilenet_v1_layers, "v2": model.mobilenet_v2_layers}[arch]
    layers = build(width=width, input_size=input_size)
    if isinstance(layers, tuple):  # (layers, torchvision key map)
        layers = layers[0]
    return tuple(layer.spec() for layer in layers)


def stage_chunks(spec: dict, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(macs, bytes_in, bytes_out) of the K output-channel chunks of one layer, fp32.

    Channel-wise kinds (depthwise, global pooling) need only their own input channels;
    the others need the whole input tensor.
    """
    out, inp = spec["out_shape"], spec["in_shape"]
    c, out_px = out[-1], int(np.prod(out[:-1]))
    in_px = int(np.prod(inp[:-1]))
    sizes = np.array([len(a) for a in np.array_split(np.arange(c), k)], dtype=float)
    macs = spec["macs"] * sizes / c
    if spec["kind"] in ("dwconv3x3", "gap"):
        bytes_in = in_px * sizes * 4.0
    else:
        bytes_in = np.full(k, in_px * inp[-1] * 4.0)
    return macs, bytes_in, out_px * sizes * 4.0


def _loguniform(rng, lo, hi, size=None):
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size))


@dataclass
class Scenario:
    """One episode: devices (arrays over M device slots) and S stages of K chunks."""
    speed: np.ndarray        # [M, n_kinds] MAC/s at full availability
    avail_mean: np.ndarray   # [M]
    avail0: np.ndarray       # [M] true availability at t=0
    load_vol: np.ndarray
    load_tau: np.ndarray
    report_period: np.ndarray
    bandwidth: np.ndarray    # [M] bytes/s, inf for the requester itself
    latency: np.ndarray      # [M] s
    busy0: np.ndarray        # [M] s of foreign work queued at t=0
    foreign_rate: np.ndarray
    alive: np.ndarray        # [M] bool
    uplink: float
    kinds: np.ndarray        # [S] index into KINDS
    macs: np.ndarray         # [S, K]
    bytes_in: np.ndarray
    bytes_out: np.ndarray
    seed: int = 0
    fail_prob: float = 0.0
    foreign_size: float = 0.02
    names: list = field(default_factory=list)
    overhead: np.ndarray | None = None   # [M] fixed s per chunk on the device (measured runtimes); None = 0


def sample_scenario(seed: int, cfg: ScenarioConfig = ScenarioConfig()) -> Scenario:
    """Deterministic random scenario for `seed`."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(cfg.min_devices, cfg.max_devices + 1))
    base = _loguniform(rng, *cfg.speed_range, n)
    jitter = rng.uniform(0.8, 1.25, (n, len(KINDS)))
    speed = base[:, None] * np.array([KIND_SPEED[k].scenario for k in KINDS]) * jitter
    avail_mean = rng.uniform(0.15, 1.0, n)
    bw = _loguniform(rng, *cfg.bandwidth_mbit, n) * MBIT
    lat = rng.uniform(*cfg.latency_s, n)
    if rng.random() < cfg.p_local:
        bw[0], lat[0] = math.inf, 0.0
    uplink = _loguniform(rng, *cfg.uplink_mbit) * MBIT if rng.random() < cfg.p_uplink else math.inf
    arch, width, size = cfg.models[int(rng.integers(len(cfg.models)))]
    layers = model_layers(arch, width, size)
    s = min(cfg.stages, len(layers))
    first = int(rng.integers(0, len(layers) - s + 1))
    chunks = [stage_chunks(sp, cfg.k) for sp in layers[first:first + s]]
    rate = rng.uniform(*cfg.foreign_rate, n)
    return Scenario(
        speed=speed, avail_mean=avail_mean,
        avail0=np.clip(avail_mean + rng.normal(0, 0.1, n), 0.05, 1.0),
        load_vol=rng.uniform(*cfg.load_vol, n), load_tau=rng.uniform(*cfg.load_tau_s, n),
        report_period=rng.uniform(*cfg.report_period_s, n),
        bandwidth=bw, latency=lat,
        busy0=rng.exponential(cfg.foreign_size_s, n) * (rate * cfg.foreign_size_s),
        foreign_rate=rate, alive=np.ones(n, bool), uplink=uplink,
        kinds=np.array([KINDS.index(sp["kind"]) if sp["kind"] in KINDS else len(KINDS) - 1
                        for sp in layers[first:first + s]]),
        macs=np.stack([c[0] for c in chunks]), bytes_in=np.stack([c[1] for c in chunks]),
        bytes_out=np.stack([c[2] for c in chunks]),
        seed=seed, fail_prob=cfg.fail_prob, foreign_size=cfg.foreign_size_s,
        names=[f"dev{i}" for i in range(n)],
    )


def train_seeds(rng: np.random.Generator, n: int) -> list[int]:
    """n fresh training seeds (never in the held-out range)."""
    return [int(s) for s in rng.integers(0, HELDOUT_BASE, n)]


def heldout_seeds(n: int, offset: int = 0) -> list[int]:
    """The first n held-out evaluation seeds."""
    return [HELDOUT_BASE + offset + i for i in range(n)]
