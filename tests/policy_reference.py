"""The learned policy's decisions done the straightforward way: `SlotFeatures` and the MLP
in numpy, one chunk at a time. The oracle the compiled and numpy paths are checked against."""
import numpy as np

from decolla.allocators.learned import SlotFeatures, stage_vector


def mlp_scores(params: dict, feats: np.ndarray) -> np.ndarray:
    """Score of each slot: tanh MLP applied per slot, [.., M, F] -> [.., M]."""
    h = np.tanh(feats @ params["w0"] + params["b0"])
    h = np.tanh(h @ params["w1"] + params["b1"])
    return (h @ params["w2"] + params["b2"])[..., 0]


def masked_argmax(scores: np.ndarray, live: np.ndarray) -> np.ndarray:
    """Index of the best live slot along the last axis."""
    return np.argmax(np.where(live, scores, -np.inf), axis=-1)


def reference_margins(alloc, stage, chunks, devices):
    """The reference decisions of `alloc` (a LearnedAllocator) and, per chunk, best minus
    second-best slot score (relative)."""
    devs = alloc.slots(devices)
    feats = SlotFeatures(np.array([[d.speed for d in devs]]), np.array([[d.available for d in devs]]),
                         np.array([[d.bandwidth for d in devs]], dtype=float),
                         np.array([[d.latency for d in devs]]), np.array([[d.busy_s for d in devs]]),
                         np.array([stage.uplink]), np.ones((1, len(devs)), bool), alloc.m_c)
    sv = stage_vector(stage.kind, stage.index, stage.num_stages, float(sum(c.macs for c in chunks)),
                      float(sum(c.bytes_in for c in chunks)))
    names, margins = [], []
    for k, c in enumerate(chunks):
        s = mlp_scores(alloc.params, feats.features(c.macs, c.bytes_in, c.bytes_out, sv[None], k, len(chunks)))
        i = masked_argmax(s, feats.live)
        feats.commit(i)
        names.append(devs[int(i[0])].name)
        top2 = np.sort(s[0])[-2:] if len(devs) > 1 else np.array([-np.inf, s[0, 0]])
        margins.append(float(top2[1] - top2[0]) / max(1.0, abs(float(top2[1]))))
    return names, margins


def reference_assign(alloc, stage, chunks, devices) -> list[str]:
    """The device names the reference decisions give."""
    return reference_margins(alloc, stage, chunks, devices)[0]
