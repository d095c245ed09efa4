"""Play simulator episodes with torch policies, a whole population at once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from decolla.allocators.learned import SlotFeatures
from .net import scores
from .scenarios import ScenarioConfig, sample_scenario
from .simulator import Simulator


@dataclass
class Rollout:
    rewards: np.ndarray            # [B, S] stage rewards
    logp: torch.Tensor | None      # [B, S] log-probability of each stage's action (sampled runs)
    avg_slowdown: np.ndarray       # [B]
    total_reward: np.ndarray       # [B]
    latency: np.ndarray            # [B] sum of stage latencies, s


def play(theta: torch.Tensor, hidden: int, seeds: Sequence[int], cfg: ScenarioConfig, m_c: int,
         greedy: bool = True, repeats: int = 1, generator: torch.Generator | None = None) -> Rollout:
    """Run every member of theta [P, D] on every seed (`repeats` times each).

    Episodes are ordered member-major, then repeat, then seed: b = (p*repeats + r)*E + e.
    Greedy play takes the best slot; otherwise slots are sampled from the softmax and
    log-probabilities are kept with autograd for policy gradients.
    """
    P, E = theta.shape[0], len(seeds)
    base = [sample_scenario(int(s), cfg) for s in seeds]
    sim = Simulator([sc for _ in range(P * repeats) for sc in base])
    if sim.M > m_c:
        raise ValueError(f"scenarios have {sim.M} devices but the policy has M_c={m_c} slots")
    B, K = sim.B, sim.K
    logps, rewards = [], []
    while not sim.done:
        obs = sim.observation()
        plan = SlotFeatures(obs["speed"], obs["available"], obs["bandwidth"], obs["latency"], obs["busy"],
                            obs["uplink"], obs["alive"], m_c)
        live = torch.from_numpy(plan.live)
        acts = np.zeros((B, K), dtype=np.int64)
        stage_logp = 0.0
        for k in range(K):
            f = plan.features(obs["macs"][:, k], obs["bytes_in"][:, k], obs["bytes_out"][:, k],
                              obs["stage_vec"], k, K)
            ft = torch.from_numpy(f).float().reshape(P, B // P, sim.M, -1)
            s = scores(theta, ft, hidden).reshape(B, sim.M).masked_fill(~live, float("-inf"))
            if greedy:
                a = s.argmax(dim=1)
            else:
                u = torch.rand(s.shape, generator=generator).clamp_(1e-12, 1 - 1e-12)
                a = (s.detach() - torch.log(-torch.log(u))).argmax(dim=1)
                stage_logp = stage_logp + torch.log_softmax(s, dim=1).gather(1, a[:, None])[:, 0]
            a_np = a.numpy()
            plan.commit(a_np)
            acts[:, k] = a_np
        rewards.append(sim.step(acts).reward)
        if not greedy:
            logps.append(stage_logp)
    return Rollout(rewards=np.stack(rewards, axis=1), logp=torch.stack(logps, 1) if logps else None,
                   avg_slowdown=sim.average_slowdown(), total_reward=sim.total_reward.copy(),
                   latency=sim.latency.copy())
