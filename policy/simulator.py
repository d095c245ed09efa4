"""Stage-execution simulator for training and judging allocation policies.

A batch of independent episodes advances one stage per `step`. In a stage the
requester sends each chunk's input to its device (per-device link, optionally a
shared requester uplink), devices compute FIFO behind foreign work at their true
(time-varying) availability, and results return. Per chunk j: P_j = time from
the stage start (chunk ready at the requester) to its result being back,
T_j = MACs / fastest live device's full speed, slowdown S_j = P_j / T_j, and the
stage's reward is the integral over the stage of sum_j -1/T_j over waiting
chunks, i.e. -sum_j S_j (gamma = 1, so the return is -sum of all slowdowns).

Allocators see only reports: availability and queue refresh at each device's
report period, so they may be stale. Every episode is deterministic per seed.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from decolla.allocators.learned import N_STAGE, stage_vector
from decolla.cost import KINDS, ChunkCost, DeviceState, Placement, StageInfo, rates
from .scenarios import Scenario, ScenarioConfig, model_layers, sample_scenario, stage_chunks

PROFILE_FORMAT = "decolla-profile/1"


def _pad(rows: list[np.ndarray], m: int, fill) -> np.ndarray:
    out = np.full((len(rows), m) + rows[0].shape[1:], fill, dtype=np.result_type(rows[0], type(fill)))
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


@dataclass
class StepResult:
    reward: np.ndarray      # [B] -sum_j S_j of the stage
    slowdown: np.ndarray    # [B, K]
    latency: np.ndarray     # [B] stage latency (last result back), s


class Simulator:
    """Batched episodes over a list of scenarios (same stage count)."""

    def __init__(self, scenarios: Sequence[Scenario]):
        self.scenarios = list(scenarios)
        sc = self.scenarios
        self.B = len(sc)
        self.S = sc[0].macs.shape[0]
        if any(s.macs.shape[0] != self.S for s in sc):
            raise ValueError("all scenarios of a batch need the same number of stages")
        self.M = max(len(s.alive) for s in sc)
        M = self.M
        self.speed = _pad([s.speed for s in sc], M, 0.0)                  # [B, M, nk]
        self.avail_mean = _pad([s.avail_mean for s in sc], M, 0.0)
        self.avail = _pad([s.avail0 for s in sc], M, 0.0)
        self.vol = _pad([s.load_vol for s in sc], M, 0.0)
        self.tau = _pad([s.load_tau for s in sc], M, 1.0)
        self.period = _pad([s.report_period for s in sc], M, 1.0)
        self.bw = _pad([s.bandwidth for s in sc], M, 1.0)
        self.lat = _pad([s.latency for s in sc], M, 0.0)
        self.busy = _pad([s.busy0 for s in sc], M, 0.0)
        self.frate = _pad([s.foreign_rate for s in sc], M, 0.0)
        self.ovh = _pad([np.zeros(len(s.alive)) if s.overhead is None else s.overhead for s in sc], M, 0.0)
        self.alive = _pad([s.alive for s in sc], M, False)
        self.uplink = np.array([s.uplink for s in sc])
        self.kinds = np.stack([s.kinds for s in sc])                       # [B, S]
        self.macs = np.stack([s.macs for s in sc])                         # [B, S, K]
        self.bytes_in = np.stack([s.bytes_in for s in sc])
        self.bytes_out = np.stack([s.bytes_out for s in sc])
        self.fail_prob = np.array([s.fail_prob for s in sc])
        self.fsize = np.array([s.foreign_size for s in sc])
        self.obs_avail = self.avail.copy()
        self.obs_busy = self.busy.copy()
        # Reference speed per kind: the fastest live device at full availability.
        self.ref_speed = np.where(self.alive[..., None], self.speed, 0.0).max(axis=1)  # [B, nk]
        # All randomness is drawn up front from each episode's own seed, so an
        # episode does not depend on which others share its batch.
        self._draws = np.ones((self.B, 5, self.S, M))                        # [B, 5, S, M]
        for b, s in enumerate(sc):
            r = np.random.default_rng([s.seed, 1])
            shape = (self.S, len(s.alive))
            self._draws[b, :, :, : shape[1]] = np.stack([
                r.standard_normal(shape), r.random(shape), r.standard_normal(shape),
                r.exponential(1.0, shape), r.random(shape)])
        self.stage = 0
        self.t = np.zeros(self.B)
        self.total_reward = np.zeros(self.B)
        self.slowdown_sum = np.zeros(self.B)
        self.n_chunks = 0
        self.latency = np.zeros(self.B)

    @property
    def done(self) -> bool:
        return self.stage >= self.S

    @property
    def K(self) -> int:
        return self.macs.shape[2]

    # ---- what allocators see -------------------------------------------------------
    def observation(self) -> dict:
        """Reported state for the current stage as [B, M] arrays (+ stage arrays)."""
        s = self.stage
        kind = self.kinds[:, s]
        speed = np.take_along_axis(self.speed, kind[:, None, None], axis=2)[..., 0]
        sv = np.stack([stage_vector(KINDS[kind[b]], s, self.S, self.macs[b, s].sum(),
                                    self.bytes_in[b, s].sum()) for b in range(self.B)])
        return {"speed": speed, "available": self.obs_avail, "bandwidth": self.bw,
                "latency": self.lat, "busy": self.obs_busy, "alive": self.alive.copy(),
                "uplink": self.uplink, "macs": self.macs[:, s], "bytes_in": self.bytes_in[:, s],
                "bytes_out": self.bytes_out[:, s], "stage_vec": sv}

    def device_states(self, b: int) -> list[DeviceState]:
        """Reported state of episode b's devices (dead ones included, alive=False)."""
        kind = self.kinds[b, self.stage]
        n = len(self.scenarios[b].alive)
        return [DeviceState(name=self.scenarios[b].names[i], speed=float(self.speed[b, i, kind]),
                            available=float(self.obs_avail[b, i]), bandwidth=float(self.bw[b, i]),
                            queue=int(round(self.obs_busy[b, i] / max(self.fsize[b], 1e-9))),
                            alive=bool(self.alive[b, i]), latency=float(self.lat[b, i]),
                            busy_s=float(self.obs_busy[b, i]), overhead_s=float(self.ovh[b, i]))
                for i in range(n)]

    def stage_info(self, b: int) -> StageInfo:
        return StageInfo(index=self.stage, num_stages=self.S, kind=KINDS[self.kinds[b, self.stage]],
                         uplink=float(self.uplink[b]))

    def chunk_costs(self, b: int) -> list[ChunkCost]:
        s = self.stage
        return [ChunkCost(int(m), int(i), int(o)) for m, i, o in
                zip(self.macs[b, s], self.bytes_in[b, s], self.bytes_out[b, s])]

    # ---- dynamics ----------------------------------------------------------------------
    def step(self, actions: np.ndarray) -> StepResult:
        """Run the current stage with chunk k of episode b on device slot actions[b, k]."""
        actions = np.asarray(actions)
        if actions.shape != (self.B, self.K):
            raise ValueError(f"actions must have shape {(self.B, self.K)}")
        if not np.take_along_axis(self.alive, actions, axis=1).all():
            raise ValueError("an allocation named a dead or missing device")
        s = self.stage
        kind = self.kinds[:, s]
        speed = np.take_along_axis(self.speed, kind[:, None, None], axis=2)[..., 0]
        plan = Placement(rates(speed, self.avail), self.bw, self.lat, self.busy, self.uplink[:, None], self.ovh)
        done = np.zeros((self.B, self.K))
        for k in range(self.K):
            macs, b_in, b_out = (x[:, s, k:k + 1] for x in (self.macs, self.bytes_in, self.bytes_out))
            done[:, k] = plan.place(actions[:, k], macs, b_in, b_out)
        t_ref = self.macs[:, s] / np.take_along_axis(self.ref_speed, kind[:, None], axis=1)
        slowdown = done / t_ref
        reward = -slowdown.sum(axis=1)
        stage_lat = done.max(axis=1)
        self._evolve(stage_lat)
        self.total_reward += reward
        self.slowdown_sum += slowdown.sum(axis=1)
        self.n_chunks += self.K
        self.latency += stage_lat
        self.stage += 1
        return StepResult(reward=reward, slowdown=slowdown, latency=stage_lat)

    def _evolve(self, dt: np.ndarray) -> None:
        z, u_rep, z_obs, e_foreign, u_fail = (self._draws[:, i, self.stage] for i in range(5))
        d = dt[:, None]
        decay = np.exp(-d / self.tau)
        self.avail = np.clip(self.avail_mean + (self.avail - self.avail_mean) * decay
                             + self.vol * np.sqrt(1 - decay ** 2) * z, 0.02, 1.0)
        self.busy = np.maximum(self.busy - d, 0.0) + self.frate * d * self.fsize[:, None] * e_foreign
        refresh = u_rep < np.minimum(d / self.period, 1.0)
        self.obs_avail = np.where(refresh, np.clip(self.avail + 0.03 * z_obs, 0.0, 1.0), self.obs_avail)
        self.obs_busy = np.where(refresh, self.busy, self.obs_busy)
        fail = (u_fail < self.fail_prob[:, None]) & self.alive
        survivors = self.alive & ~fail
        keep = survivors.any(axis=1, keepdims=True)
        self.alive = np.where(keep, survivors, self.alive)
        self.t += dt

    # ---- summaries ---------------------------------------------------------------------
    def average_slowdown(self) -> np.ndarray:
        """Mean S_j over all chunks so far, per episode."""
        return self.slowdown_sum / max(self.n_chunks, 1)

    @classmethod
    def from_seeds(cls, seeds: Sequence[int], cfg: ScenarioConfig = ScenarioConfig()) -> "Simulator":
        return cls([sample_scenario(int(s), cfg) for s in seeds])

    @classmethod
    def from_profile(cls, profile, layers: Sequence[dict] | tuple = ("v2", 1.0, 224), k: int = 6,
                     seed: int = 0, dynamic: bool = False) -> "Simulator":
        """One episode over all layers with the devices and network of a measured profile.

        `layers` is a list of layer-spec dicts or an (arch, width, input_size) triple.
        With dynamic=False the devices keep their profiled availability (no load noise,
        no foreign work, no failures).
        """
        prof = load_profile(profile)
        specs = model_layers(*layers) if isinstance(layers, tuple) else list(layers)
        chunks = [stage_chunks(sp, k) for sp in specs]
        n = len(prof["devices"])
        rng = np.random.default_rng(seed)
        speed = np.array([[1.0 / d["sec_per_mac"].get(kd, d["sec_per_mac"].get("default", np.nan))
                           for kd in KINDS] for d in prof["devices"].values()])
        if np.isnan(speed).any():
            raise ValueError("profile lacks sec_per_mac for some layer kinds (add a 'default')")
        avail = np.array([d.get("available", 1.0) for d in prof["devices"].values()])
        sc = Scenario(
            speed=speed, avail_mean=avail, avail0=avail.copy(),
            load_vol=np.full(n, 0.2 if dynamic else 0.0), load_tau=np.full(n, 0.5),
            report_period=np.full(n, 0.2), bandwidth=np.array([_bw(d) for d in prof["devices"].values()]),
            latency=np.array([d.get("latency_s", 0.0) for d in prof["devices"].values()]),
            busy0=np.zeros(n), foreign_rate=np.full(n, 2.0 if dynamic else 0.0), alive=np.ones(n, bool),
            uplink=_bw(prof), kinds=np.array([KINDS.index(sp["kind"]) if sp["kind"] in KINDS
                                              else len(KINDS) - 1 for sp in specs]),
            macs=np.stack([c[0] for c in chunks]), bytes_in=np.stack([c[1] for c in chunks]),
            bytes_out=np.stack([c[2] for c in chunks]), seed=int(rng.integers(1 << 31)),
            fail_prob=0.0, names=list(prof["devices"]),
            overhead=np.array([d.get("chunk_overhead_s", 0.0) for d in prof["devices"].values()]))
        return cls([sc])


def run_allocator(sim: Simulator, allocator) -> Simulator:
    """Play all remaining stages of every episode with an Allocator (name-based API)."""
    while not sim.done:
        acts = np.zeros((sim.B, sim.K), dtype=int)
        for b in range(sim.B):
            devs = sim.device_states(b)
            index = {d.name: i for i, d in enumerate(devs)}
            names = allocator.assign(sim.stage_info(b), sim.chunk_costs(b), devs)
            acts[b] = [index[n] for n in names]
        sim.step(acts)
    return sim


# ---- measured profiles ---------------------------------------------------------------------

def _bw(d: dict) -> float:
    v = d.get("bandwidth")
    return math.inf if v is None else float(v)


def load_profile(profile) -> dict:
    """Read and check a profile (path, JSON text or dict).

    Format (JSON): {"format": "decolla-profile/1", "uplink": bytes/s or null,
    "devices": {name: {"sec_per_mac": {kind: s, ..., "default": s},
    "bandwidth": bytes/s or null for the requester itself, "latency_s": s,
    "available": 0..1, optional "chunk_overhead_s": fixed s per chunk}}}
    """
    if isinstance(profile, (str, os.PathLike)) and os.path.exists(profile):
        with open(profile) as fh:
            profile = json.load(fh)
    elif isinstance(profile, str):
        profile = json.loads(profile)
    if profile.get("format") != PROFILE_FORMAT:
        raise ValueError(f"not a {PROFILE_FORMAT} profile")
    if not profile.get("devices"):
        raise ValueError("profile has no devices")
    for name, d in profile["devices"].items():
        if not d.get("sec_per_mac"):
            raise ValueError(f"device {name!r} has no sec_per_mac")
    return profile


def profile_devices(profile, kind: str) -> list[DeviceState]:
    """DeviceState of every profiled device for a stage of `kind`."""
    prof = load_profile(profile)
    out = []
    for name, d in prof["devices"].items():
        spm = d["sec_per_mac"].get(kind, d["sec_per_mac"].get("default"))
        out.append(DeviceState(name=name, speed=1.0 / spm, available=float(d.get("available", 1.0)),
                               bandwidth=_bw(d), latency=float(d.get("latency_s", 0.0)),
                               overhead_s=float(d.get("chunk_overhead_s", 0.0))))
    return out


def predict_stage_latency(devices: Sequence[DeviceState], stage: StageInfo,
                          chunks: Sequence[ChunkCost], assignment: Sequence[str]) -> float:
    """Predicted seconds from stage start until the last chunk result is back."""
    index = {d.name: i for i, d in enumerate(devices)}
    plan = Placement.of(devices, stage.uplink)
    return max((plan.place(index[name], c.macs, c.bytes_in, c.bytes_out)
                for c, name in zip(chunks, assignment)), default=0.0)


def validate_profile(profile, traces: Sequence[dict], tolerance: float = 0.2) -> dict:
    """Compare predicted and measured stage latencies.

    Each trace: {"kind": str, "chunks": [[macs, bytes_in, bytes_out], ...],
    "devices": [name per chunk], "measured_s": float, optional "uplink": bytes/s}.
    Returns relative errors and the share of stages within `tolerance`.
    """
    errs, rows = [], []
    for i, tr in enumerate(traces):
        devs = profile_devices(profile, tr["kind"])
        up = tr.get("uplink", _bw(load_profile(profile)))
        st = StageInfo(index=i, num_stages=len(traces), kind=tr["kind"],
                       uplink=math.inf if up is None else float(up))
        chunks = [ChunkCost(*map(int, c)) for c in tr["chunks"]]
        pred = predict_stage_latency(devs, st, chunks, tr["devices"])
        err = (pred - tr["measured_s"]) / tr["measured_s"]
        errs.append(err)
        rows.append({"kind": tr["kind"], "predicted_s": pred, "measured_s": tr["measured_s"],
                     "rel_error": err})
    a = np.abs(np.array(errs))
    total_pred = sum(r["predicted_s"] for r in rows)
    total_meas = sum(r["measured_s"] for r in rows)
    return {"stages": rows, "median_abs_rel_error": float(np.median(a)),
            "p90_abs_rel_error": float(np.quantile(a, 0.9)),
            "within_tolerance": float((a <= tolerance).mean()), "tolerance": tolerance,
            "total_rel_error": (total_pred - total_meas) / total_meas}


__all__ = ["Simulator", "StepResult", "run_allocator", "load_profile", "profile_devices",
           "predict_stage_latency", "validate_profile", "PROFILE_FORMAT", "N_STAGE"]
