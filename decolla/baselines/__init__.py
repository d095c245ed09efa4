"""The paper's three baselines on DeColla's runtime and kernels.

mobile-only (one device runs the whole network), partition-offloading (a device runs layers
[0, p), the edge server the rest; p chosen Neurosurgeon-style) and hierarchical (contiguous
layer groups, one per device, forwarding along a route; re-planned after a lost device's t1).
`partition` holds the pure logic, `actors` the Thespian flow, `client` the API,
`metrics` the busy/idle/waiting figures computed from traces (baselines and DeColla alike).
"""
from decolla.baselines.partition import (RouteError, Segment, crossing, cut_bytes,
                                         hierarchical_route, neurosurgeon_split,
                                         partition_route, run_segment, split_balanced)

__all__ = ["RouteError", "Segment", "crossing", "cut_bytes", "hierarchical_route",
           "neurosurgeon_split", "partition_route", "run_segment", "split_balanced"]
