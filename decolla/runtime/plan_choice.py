"""Which plan a new request gets: the configured one, or for `auto` the one the cluster's
state calls for (how busy it is, its devices' speeds, its links as measured)."""
from __future__ import annotations

from decolla.plans import Plan, PlanError, build_plan, parse_plan_name
from decolla.runtime.messages import ConfigureRequester, Membership


class PlanChooser:
    """A requester's plans, built once per distinct choice."""

    def __init__(self, cfg: ConfigureRequester):
        self.cfg = cfg
        self.auto: dict | None = None     # the options of an `auto` plan's name
        self.stated_mbit = 0.0            # the link speed an `auto` plan's name states
        self.plans: dict[tuple, Plan] = {}
        try:           # a bad plan name is reported with the first request (build_plan says why)
            name, opts = parse_plan_name(cfg.plan)
        except (PlanError, ValueError):
            return
        if name == "auto":
            self.auto = opts
            self.stated_mbit = float(opts.get("bandwidth_mbit", 0))

    def forget(self) -> None:
        """The leader's model changed: the plans built for the old one are gone."""
        self.plans.clear()

    @property
    def measures_links(self) -> bool:
        """Whether plans need the links measured (`auto` without a stated link speed)."""
        return self.auto is not None and not self.stated_mbit

    def choice(self, n: int, in_flight: int, speeds: list[float],
               bandwidth_mbit: float | None = None,
               shared_link: bool | None = None) -> tuple[str, int, dict]:
        """(kind, k, extra build_plan arguments) for a new request with `n` usable devices,
        `in_flight` requests already running in the cluster, the devices' calibrated
        `speeds` and the links as measured.

        `auto` sends whole requests (the `single` plan, placed by the allocator) while at
        least `whole_above` requests are in flight (default 1: only a request that finds
        the cluster idle is split; 0 = never): splitting costs extra messages and halo
        work, which only pays while devices would otherwise sit idle. Figures are rounded
        so that few distinct plans get built."""
        opts = self.auto
        kind, k, extra = self.cfg.plan, self.cfg.k or 2 * n, {}
        if opts is None:
            return kind, k, extra
        if 0 < int(opts.get("whole_above", 1)) <= in_flight:
            return "single", 1, extra
        if "devices" not in opts:
            extra["devices"] = n
        speeds = sorted(s for s in speeds if s > 0)
        if speeds and "gmacs" not in opts:
            extra["gmacs"] = float(f"{speeds[len(speeds) // 2] / 1e9:.1g}")
        if bandwidth_mbit and "bandwidth_mbit" not in opts:
            extra["bandwidth_mbit"] = float(f"{bandwidth_mbit:.1g}")
            if shared_link is not None and "shared_link" not in opts:
                extra["shared_link"] = int(shared_link)
        return kind, k, extra

    def plan(self, membership: Membership, n: int, running: int, links) -> Plan:
        """The plan for a new request with `n` usable devices while this requester runs
        `running` requests; other requesters' count too, as the registrar last pushed
        them. `links`: a LinkProber. Raises PlanError."""
        elsewhere = sum(c for node, c in membership.in_flight.items() if node != self.cfg.node)
        kind, k, extra = self.choice(
            n, running + elsewhere,
            [getattr(d, "speed", 0) for d in membership.devices],    # calibrated at start-up
            links.bandwidth_mbit(), links.shared)
        key = (kind, k, n, tuple(sorted(extra.items())))
        if key not in self.plans:
            self.plans[key] = build_plan(membership.specs, k, kind, membership.input_shape,
                                                 self.cfg.min_chunk_macs, **extra)
        return self.plans[key]
