"""Train the allocation policy with DRL, ES or DRL-ES against the simulator.

    python -m decolla.policy.train --algo {drl,es,drl-es} --iterations N --seed S --out DIR

DRL: REINFORCE with a per-scenario, per-stage baseline (several sampled rollouts of
the same scenario). ES: EvoTorch PGPE, the population evaluated in one batched
forward per decision. DRL-ES: PGPE whose centre update is blended with the
REINFORCE gradient at the centre. Writes DIR/policy.npz, DIR/curve.json and
periodic DIR/ckpt_XXXXX.npz.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import structlog
import torch
from tqdm import tqdm

from decolla.helpformat import HelpFormatter

from .net import export_npz, init_params, n_params
from .rollout import play
from .scenarios import HELDOUT_BASE, ScenarioConfig, train_seeds

log = structlog.get_logger("decolla.policy.train")

VALIDATION_BASE = HELDOUT_BASE + 500_000  # curve seeds: outside training and held-out test seeds


@dataclass
class TrainConfig:
    """Training settings; lr, iterations, children, M_c and K default to the paper's."""
    algo: str = "drl-es"
    iterations: int = 1500
    lr: float = 0.002
    children: int = 10            # ES population size (PGPE samples symmetric pairs)
    m_c: int = 100
    k: int = 6
    hidden: int = 32
    episodes: int = 4             # training scenarios per iteration
    repeats: int = 4              # sampled rollouts per scenario for the REINFORCE baseline
    stdev_init: float = 0.05
    stdev_lr: float = 0.1
    blend: float = 0.5            # DRL-ES: weight of the policy gradient in the centre update
    eval_every: int = 10
    eval_episodes: int = 16
    checkpoint_every: int = 100
    seed: int = 0
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)


def _returns_to_go(rewards: np.ndarray) -> np.ndarray:
    return np.flip(np.cumsum(np.flip(rewards, 1), 1), 1).copy()


class PolicyGradient:
    """REINFORCE with baseline: ascent direction of the expected return at theta."""

    def __init__(self, cfg: TrainConfig, rng: np.random.Generator, gen: torch.Generator):
        self.cfg, self.rng, self.gen = cfg, rng, gen

    def __call__(self, theta: torch.Tensor) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        seeds = train_seeds(self.rng, cfg.episodes)
        th = theta.detach().clone().reshape(1, -1).requires_grad_(True)
        r = play(th, cfg.hidden, seeds, cfg.scenario, cfg.m_c, greedy=False,
                 repeats=cfg.repeats, generator=self.gen)
        g = _returns_to_go(r.rewards).reshape(cfg.repeats, cfg.episodes, -1)
        # Scale each scenario by its mean return so easy and hard scenarios weigh alike.
        scale = np.abs(g[:, :, :1].mean(axis=0, keepdims=True)) + 1e-9
        adv = ((g - g.mean(axis=0, keepdims=True)) / scale).reshape(r.rewards.shape)
        loss = -(torch.from_numpy(adv).float() * r.logp).sum(dim=1).mean()
        loss.backward()
        return -th.grad[0].detach(), {"train_reward": float(r.total_reward.mean())}


def _make_problem(cfg: TrainConfig, rng: np.random.Generator):
    from evotorch import Problem

    class AllocationProblem(Problem):
        """Fitness: mean greedy return over fresh training scenarios, scale-normalised per scenario."""

        def __init__(self):
            super().__init__("max", solution_length=n_params(cfg.hidden), initial_bounds=(-0.1, 0.1),
                             dtype=torch.float32, num_actors=None)

        def _evaluate_batch(self, batch):
            theta = batch.values
            seeds = train_seeds(rng, cfg.episodes)
            with torch.no_grad():
                r = play(theta, cfg.hidden, seeds, cfg.scenario, cfg.m_c, greedy=True)
            tot = r.total_reward.reshape(theta.shape[0], cfg.episodes)
            fit = (tot / (np.abs(tot).mean(axis=0, keepdims=True) + 1e-9)).mean(axis=1)
            batch.set_evals(torch.from_numpy(fit).float())

    return AllocationProblem()


def _make_searcher(cfg: TrainConfig, problem, pg: PolicyGradient | None):
    from evotorch.algorithms import PGPE

    class BlendedPGPE(PGPE):
        """PGPE whose centre gradient is mixed with a REINFORCE gradient (DRL-ES)."""

        def _update_distribution(self, gradients: dict):
            if pg is not None and cfg.blend > 0:
                g_es = gradients["mu"]
                g_pg, _ = pg(self._distribution.parameters["mu"])
                g_pg = g_pg.to(g_es) * (g_es.norm() / (g_pg.norm() + 1e-12))
                gradients = dict(gradients, mu=(1 - cfg.blend) * g_es + cfg.blend * g_pg)
            super()._update_distribution(gradients)

    return BlendedPGPE(problem, popsize=cfg.children, center_learning_rate=cfg.lr,
                       stdev_learning_rate=cfg.stdev_lr, stdev_init=cfg.stdev_init,
                       center_init=init_params(cfg.hidden, cfg.seed), optimizer="adam",
                       ranking_method="centered")


def evaluate(theta: torch.Tensor, cfg: TrainConfig, seeds) -> dict:
    """Greedy average slowdown, total reward and latency of one policy on fixed seeds."""
    with torch.no_grad():
        r = play(theta.reshape(1, -1).float(), cfg.hidden, seeds, cfg.scenario, cfg.m_c, greedy=True)
    return {"avg_slowdown": float(r.avg_slowdown.mean()), "total_reward": float(r.total_reward.mean()),
            "latency_s": float(r.latency.mean())}


def train(cfg: TrainConfig, out: str | None = None, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Train per cfg; returns the final flat parameters and the training curve."""
    if cfg.algo not in ("drl", "es", "drl-es"):
        raise ValueError(f"unknown algo {cfg.algo!r}")
    if cfg.scenario.k != cfg.k:
        cfg = replace(cfg, scenario=replace(cfg.scenario, k=cfg.k))
    if out:
        os.makedirs(out, exist_ok=True)
    # Tensors are tiny: extra threads only spin against each other (8x slower on 2 busy cores).
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    val_seeds = [VALIDATION_BASE + i for i in range(cfg.eval_episodes)]
    pg = PolicyGradient(cfg, rng, gen)
    curve = {"algo": cfg.algo, "config": _jsonable(asdict(cfg)), "iteration": [], "avg_slowdown": [],
             "total_reward": [], "latency_s": [], "wall_s": []}
    t0 = time.perf_counter()

    if cfg.algo == "drl":
        theta = init_params(cfg.hidden, cfg.seed).requires_grad_(False)
        opt = torch.optim.Adam([theta], lr=cfg.lr)
        theta.requires_grad_(True)

        def step():
            g, _ = pg(theta.detach())
            opt.zero_grad()
            theta.grad = -g
            opt.step()

        current = lambda: theta.detach()
    else:
        problem = _make_problem(cfg, rng)
        searcher = _make_searcher(cfg, problem, pg if cfg.algo == "drl-es" else None)
        step = searcher.step
        current = lambda: searcher.status["center"].detach().clone()

    def record(it: int):
        ev = evaluate(current(), cfg, val_seeds)
        curve["iteration"].append(it)
        for key in ("avg_slowdown", "total_reward", "latency_s"):
            curve[key].append(ev[key])
        curve["wall_s"].append(time.perf_counter() - t0)
        return ev

    record(0)
    bar = tqdm(range(1, cfg.iterations + 1), desc=cfg.algo, disable=not progress, mininterval=1.0)
    for it in bar:
        step()
        if it % cfg.eval_every == 0 or it == cfg.iterations:
            ev = record(it)
            bar.set_postfix(slowdown=f"{ev['avg_slowdown']:.1f}")
        if out and it % cfg.checkpoint_every == 0:
            export_npz(current(), cfg.hidden, cfg.m_c, os.path.join(out, f"ckpt_{it:05d}.npz"),
                       algo=cfg.algo, iteration=it)
    theta = current()
    curve["train_seconds"] = time.perf_counter() - t0
    if out:
        export_npz(theta, cfg.hidden, cfg.m_c, os.path.join(out, "policy.npz"), algo=cfg.algo,
                   iteration=cfg.iterations)
        with open(os.path.join(out, "curve.json"), "w") as fh:
            json.dump(curve, fh, indent=1)
    log.info("trained", algo=cfg.algo, iterations=cfg.iterations, seconds=round(curve["train_seconds"], 1),
             final_slowdown=curve["avg_slowdown"][-1], initial_slowdown=curve["avg_slowdown"][0])
    return theta, curve


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    return d


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m decolla.policy.train", description=__doc__,
                                 formatter_class=HelpFormatter)
    d = TrainConfig()
    ap.add_argument("--algo", choices=("drl", "es", "drl-es"), default=d.algo,
                    help="REINFORCE, PGPE evolution strategy, or PGPE blended with REINFORCE")
    ap.add_argument("--iterations", type=int, default=d.iterations, help="training iterations")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of scenarios and sampling")
    ap.add_argument("--out", required=True,
                    help="output folder: policy.npz, curve.json, ckpt_XXXXX.npz")
    ap.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    ap.add_argument("--children", type=int, default=d.children, help="ES population size")
    ap.add_argument("--m-c", type=int, default=d.m_c,
                    help="M_c: the policy's device slots (most devices it allocates among)")
    ap.add_argument("--k", type=int, default=d.k, help="K: chunks per stage in the training scenarios")
    ap.add_argument("--hidden", type=int, default=d.hidden, help="hidden units of the policy")
    ap.add_argument("--episodes", type=int, default=d.episodes,
                    help="training scenarios per iteration")
    ap.add_argument("--repeats", type=int, default=d.repeats,
                    help="sampled rollouts per scenario (the REINFORCE baseline)")
    ap.add_argument("--blend", type=float, default=d.blend,
                    help="DRL-ES: weight of the policy gradient in the centre update")
    ap.add_argument("--eval-every", type=int, default=d.eval_every,
                    help="iterations between greedy evaluations (curve.json)")
    ap.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                    help="iterations between checkpoints")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> None:
    ap = build_parser()
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = TrainConfig(algo=a.algo, iterations=a.iterations, seed=a.seed, lr=a.lr, children=a.children,
                      m_c=a.m_c, k=a.k, hidden=a.hidden, episodes=a.episodes, repeats=a.repeats,
                      blend=a.blend, eval_every=a.eval_every, checkpoint_every=a.checkpoint_every)
    train(cfg, a.out, progress=not a.no_progress)


if __name__ == "__main__":
    main()
