"""Link measurement for the requester actor: which probes go out, what echoes say.

A mixin for decolla.actors.requester.Requester, kept apart so the requester's class holds
only the requests' life. The host provides `plans` (PlanChooser), `ctx` (its Context),
`_deliver(device, msg)` and `_start_backlog()`; the decisions are
decolla.runtime.links.LinkProber's.
"""
from __future__ import annotations

from decolla.log import get_logger
from decolla.runtime.links import LinkProber
from decolla.runtime.messages import LinkEcho

log = get_logger("requester")
PROBE = "probe"          # wake-up payload (PROBE, seq): that probe's time is up


class MeasuresLinks:
    """Measures the devices' links an `auto` plan needs; requests wait in the backlog
    until the first measurement is over."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.links = LinkProber()
        self.links_reported = False

    def _track_links(self, devices: list) -> None:
        """Measure the links of the live devices with workers (a device that misses
        heartbeats or check-ins keeps its figure: no re-probing a slow link each time it
        flaps)."""
        if self.plans.measures_links:
            self.links.track([d.name for d in devices if d.alive and d.worker is not None],
                             keep=[d.name for d in devices])
            self._probe()

    def _measuring_links(self) -> bool:
        """True while `auto` waits for the first measurement of the links to plan with
        (once over, devices that join later are measured while requests go on)."""
        return self.plans.measures_links and not self.links.settled

    def _probe(self) -> None:
        for dev, probe in self.links.next_probes():
            self._deliver(dev, probe)
            self.wakeupAfter(self.links.timeout_s, payload=(PROBE, probe.seq))
        if not self.links.settled:
            self.links_reported = False
        elif not self.links_reported:
            self.links_reported = True
            log.info("links measured", median_mbit=round(self.links.bandwidth_mbit() or 0, 1),
                     shared=self.links.shared)
        self._start_backlog()

    def receiveMsg_LinkEcho(self, msg: LinkEcho, sender):
        link = self.links.echo(msg)
        if link is not None:
            log.info("link measured", device=msg.device, mbit=round(link.mbit, 1),
                     rtt_ms=round(link.rtt_s * 1e3, 2))
            self.ctx.sup.link_measured(msg.device, link.bytes_per_s)
        self._probe()

    def _probe_expired(self, payload) -> bool:
        """Handle a probe's wake-up (True if `payload` was one)."""
        if not (isinstance(payload, tuple) and payload[0] == PROBE):
            return False
        dev = self.links.expire(payload[1])
        if dev is not None:
            log.warning("link probe unanswered; device not measured", device=dev)
            self._probe()
        return True
