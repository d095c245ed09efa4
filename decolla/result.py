"""The outcome of one inference as the embedding API returns it, and top-k ranking."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from decolla.runtime.trace import Trace


@dataclass
class Result:
    """Outcome of one inference.

    `latency` is `trace.span()`: seconds from the caller sending the request to the reply
    reaching it, on one clock, so it includes the wait before the plan ran (plan choice,
    link measurement, earlier requests; `trace.phases()` splits it) and the reply's way
    back, not the caller's own image checks. `bytes_moved`: bytes of every chunk attempt's
    inputs, outputs and halos.
    """
    request: str
    logits: np.ndarray
    top_k: list[tuple[int, float]]          # (class, probability) best first
    latency: float                          # seconds: trace.span()
    trace: Trace
    stats: dict = field(default_factory=dict)

    @property
    def bytes_moved(self) -> int:
        return self.trace.bytes_moved()

    @property
    def devices_used(self) -> list[str]:
        return sorted(self.trace.devices())

    @property
    def retries(self) -> int:
        return len(self.trace.reassigned())

    def save_trace(self, path: str) -> None:
        """Chrome trace JSON (open in https://ui.perfetto.dev or chrome://tracing)."""
        self.trace.save_chrome(path)


def top_k(logits: np.ndarray, k: int = 5) -> list[tuple[int, float]]:
    """Best k classes with softmax probabilities."""
    z = np.asarray(logits, dtype=np.float64).ravel()
    p = np.exp(z - z.max())
    p /= p.sum()
    idx = np.argsort(-p, kind="stable")[:k]
    return [(int(i), float(p[i])) for i in idx]
