"""Requester: runs inferences for its callers across the devices of the cluster.

A Thespian shell around decolla.runtime.request, where each request's decisions are
made (which device computes which chunk, deadlines, which result wins). This actor
feeds it events (results and failures from the workers, ticks, membership, lost
connections) with the time, and carries out the actions it returns: work and
cancellations go on the workers' data plane (decolla.runtime.dataplane) when they offer
one, as actor messages otherwise; replies and live events go to the caller; a `local`
stage is computed here with the leader's model, as a worker computes a chunk. Around
the requests it picks each one's plan, measures the links an `auto` plan needs (requests
wait in a backlog meanwhile) and tells the registrar how many requests are in flight.
"""
from __future__ import annotations

import time

from thespian.actors import (ActorExitRequest, ActorTypeDispatcher, PoisonMessage,
                             WakeupMessage)

from decolla.actors import system
from decolla.actors.link_measuring import MeasuresLinks
from decolla.actors.preload import ModelRefused, leader_model
from decolla.actors.registrar import RegistrarFinder
from decolla.allocators import make_allocator
from decolla.forward import check_image
from decolla.log import get_logger
from decolla.plans import PlanError
from decolla.plans.compute import compute_chunk
from decolla.runtime import channels, dataplane
from decolla.runtime.events import EventBatches
from decolla.runtime.messages import (ChunkEvent, ChunkFailed, ChunkResult, ChunkResults,
                                      ConfigureRequester, FindRegistrar, InferError,
                                      InferRequest, InFlight, Membership, Ready,
                                      RegistrarAt, Subscribe, Unsubscribe)
from decolla.runtime.plan_choice import PlanChooser
from decolla.runtime.request import Context, Deliver, Request, RunLocal, Tell, Time
from decolla.runtime.supervisor import Supervisor

log = get_logger("requester")
TICK_S = 0.05
LEADER_QUIET_S = 3.0    # no membership for this long: look the registrar up again
LOOK_AGAIN_S = 1.0      # at most one look-up of the registrar this often


def _now() -> Time:
    return Time(time.monotonic(), time.time())


class Requester(MeasuresLinks, dataplane.WatchesInbox, ActorTypeDispatcher):
    """Per-client coordinator of inferences (lives in the client's actor system)."""

    RECEIVER = channels.REQUESTER

    actorSystemCapabilityCheck = staticmethod(system.on_named_node)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.cfg: ConfigureRequester | None = None
        self.ctx: Context | None = None
        self.membership: Membership | None = None
        self.requests: dict[str, Request] = {}
        self.plans: PlanChooser | None = None
        self.ticking = False
        self.waiting_ready: list = []
        self.backlog: list = []
        self.reported_in_flight = 0
        self.local_layers: dict | None = None     # {} once this node cannot compute locally
        self.local_cache: dict = {}
        self.registrar = None
        self.heard = 0.0                          # when the registrar last spoke
        self.looked = 0.0                         # when we last asked where it is
        self.events = EventBatches()

    # ------------------------------------------------------------ set-up
    def receiveMsg_ConfigureRequester(self, msg: ConfigureRequester, sender):
        try:
            allocator = make_allocator(msg.allocator)
        except Exception as exc:
            self.send(sender, Ready(False, f"allocator {msg.allocator!r}: {exc}"))
            return
        self.cfg, self.plans = msg, PlanChooser(msg)
        sup = Supervisor(slack=msg.deadline_slack, floor=msg.deadline_floor,
                         link_bytes_per_s=self.plans.stated_mbit * 1e6 / 8)
        self.ctx = Context(msg, sup, allocator)
        self.waiting_ready.append(sender)
        self.registrar, self.heard = msg.registrar, time.monotonic()
        self.send(msg.registrar, Subscribe(msg.node))
        self.wakeupAfter(LEADER_QUIET_S, payload="leader")

    def receiveMsg_Membership(self, msg: Membership, sender):
        if self.membership is not None and msg.digest != self.membership.digest:
            log.warning("leader model changed; dropping plans", digest=msg.digest[:12])
            self.plans.forget()
            self.local_layers, self.local_cache = None, {}
        self.membership, self.registrar, self.heard = msg, sender, time.monotonic()
        lost = self.ctx.update(msg.devices, self.cfg.data_plane)
        if self.peers is not None:
            self.peers.forget(set(self.ctx.data_addrs.values()))
        self._track_links(msg.devices)
        status = {d.name: d.status for d in msg.devices}
        for name in lost:
            log.warning("device not usable; its chunks move once late", device=name,
                        status=status.get(name, "gone"))
        for addr in self.waiting_ready:
            self.send(addr, Ready(True))
        self.waiting_ready.clear()
        self._start_backlog()
        self._each(Request.membership, _now())

    # ------------------------------------------------------------ requests
    def receiveMsg_InferRequest(self, msg: InferRequest, sender):
        if self.cfg is None:
            self.send(sender, InferError(msg.request, "requester is not configured"))
        elif self.membership is None or self._measuring_links():
            self.backlog.append((msg, sender))
        else:
            self._start_request(msg, sender)

    def _start_request(self, msg: InferRequest, sender) -> None:
        if msg.request in self.requests:
            self.send(sender, InferError(msg.request, "duplicate request id", "input"))
            return
        try:
            image = check_image(msg.image, self.membership.input_shape)
        except (TypeError, ValueError) as exc:
            log.info("request rejected", request=msg.request, error=str(exc))
            self.send(sender, InferError(msg.request, f"bad image: {exc}", "input"))
            return
        sup = self.ctx.sup
        try:
            plan = self.plans.plan(self.membership, len(sup.usable()) or len(sup.members()) or 1,
                                   len(self.requests), self.links)
        except PlanError as exc:
            self.send(sender, InferError(msg.request, f"bad plan: {exc}", "input"))
            return
        t = _now()
        req = Request(msg.request, plan, image, self.ctx, t, msg.events, sender)
        self.requests[req.id] = req
        self._report_in_flight()
        self._do(req, req.start(t))
        self._ensure_tick()

    def _do(self, req: Request, actions: list) -> None:
        """Carry out `req`'s actions; forget it once it is done."""
        for a in actions:
            if isinstance(a, Deliver):
                self._deliver(a.device, a.msg)
            elif isinstance(a, Tell) and isinstance(a.msg, ChunkEvent):
                self.events.add(req.id, req.caller, a.msg, time.monotonic())
            elif isinstance(a, Tell):
                self._send_events(self.events.take(req.id))
                self.send(req.caller, a.msg)
            elif isinstance(a, RunLocal):
                self._do(req, self._run_local(req, a))
        if req.done and self.requests.get(req.id) is req:
            del self.requests[req.id]
            self._report_in_flight()

    def _send_events(self, batch) -> None:
        if batch is not None:
            self.send(*batch)

    def _each(self, event, *args) -> None:
        """Feed `event(request, *args)` to every request in flight."""
        for req in list(self.requests.values()):
            self._do(req, event(req, *args))

    def _run_local(self, req: Request, work: RunLocal) -> list:
        """Compute a `local` stage's chunk here, as a worker would (its events back)."""
        if self.local_layers is None:
            try:
                model = leader_model(self.membership.model, self.membership.digest)
                self.local_layers = {l.name: l for l in model.layers}
            except ModelRefused as exc:
                log.warning("cannot compute locally; sending local stages out", error=str(exc))
                self.local_layers = {}
        if not self.local_layers:
            return req.local_failed(_now())
        start = _now()
        try:
            y = compute_chunk(self.local_layers, work.stage, work.chunk, work.inputs,
                              cache=self.local_cache)
        except Exception as exc:
            log.warning("local stage failed; sending it out", stage=work.stage.index,
                        error=repr(exc))
            return req.local_failed(_now())
        return req.local_done(y, start, _now())

    def _deliver(self, dev: str, msg) -> None:
        """Send `msg` to `dev`'s worker: on its data plane if it has one, else as a message."""
        if self.peers is None and self.ctx.data_addrs:
            self.dial()
        self.send_data(self.ctx.data_addrs.get(dev), self.ctx.workers[dev], msg)

    def _report_in_flight(self) -> None:
        """Tell the registrar how many requests are in flight here: other requesters'
        `auto` counts them too (whole_above)."""
        n = len(self.requests)
        if n != self.reported_in_flight:
            self.reported_in_flight = n
            self.send(self.registrar, InFlight(n))

    def _start_backlog(self) -> None:
        if self.membership is None or self._measuring_links():
            return
        backlog, self.backlog = self.backlog, []
        for req_msg, reply_to in backlog:
            self._start_request(req_msg, reply_to)

    # ------------------------------------------------------------ results
    def receiveMsg_ChunkResult(self, msg: ChunkResult, sender):
        self._from_device(msg, Request.result)

    def receiveMsg_ChunkResults(self, msg: ChunkResults, sender):
        for result in msg.results:
            self._from_device(result, Request.result)

    def receiveMsg_ChunkFailed(self, msg: ChunkFailed, sender):
        self._from_device(msg, Request.failed)

    def _from_device(self, msg, event) -> None:
        t = _now()
        self.ctx.sup.heard_from(msg.device)     # whatever became of the request
        req = self.requests.get(msg.request)
        if req is not None:
            self._do(req, event(req, msg, t))

    def receiveMsg_Closed(self, msg, conn):
        """A data connection ended: what was sent on it is lost."""
        dev = next((d for d, a in self.ctx.data_addrs.items() if a == conn.address), None)
        if dev is not None:
            # a new leader's worker stops the old one: ask at once whether the registrar
            # changed, rather than after LEADER_QUIET_S of silence
            self._look_for_registrar()
            self.ctx.sup.suspect(dev)
            self._each(Request.connection_lost, dev, _now())

    # ------------------------------------------------------------ time
    def _ensure_tick(self) -> None:
        if not self.ticking and self.requests:
            self.ticking = True
            self.wakeupAfter(TICK_S, payload="tick")

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender):
        if self._probe_expired(msg.payload):
            return
        if msg.payload == "leader":
            self._find_leader()
            return
        if msg.payload != "tick":
            return
        self.ticking = False
        for batch in self.events.due(time.monotonic()):
            self._send_events(batch)
        self._each(Request.tick, _now())
        self._ensure_tick()

    # ------------------------------------------------------------ leader
    def _find_leader(self) -> None:
        """The registrar pushes membership at least every second: silence means the leader
        restarted (a new registrar) or is away; ask the leader, whoever it now is, where its
        registrar is (in-flight requests go on with the devices known meanwhile)."""
        if time.monotonic() - self.heard > LEADER_QUIET_S:
            if not self.ctx.looking:
                log.warning("no word from the leader; looking for its registrar")
            self._look_for_registrar()      # again each LOOK_AGAIN_S until it answers
        self.wakeupAfter(LOOK_AGAIN_S, payload="leader")

    def _look_for_registrar(self) -> None:
        """Ask the leader where its registrar is (once per LOOK_AGAIN_S); until the next
        membership, chunks out of attempts wait for the new workers (Context.looking)."""
        now = time.monotonic()
        self.ctx.looking = True
        if now - self.looked < LOOK_AGAIN_S:
            return
        self.looked = now
        finder = self.createActor(RegistrarFinder,
                                  targetActorRequirements={system.CAP_ROLE: "leader"})
        self.send(finder, FindRegistrar())

    def receiveMsg_RegistrarAt(self, msg: RegistrarAt, sender):
        if msg.registrar != self.registrar:
            log.info("found the leader's registrar again")
        self.send(msg.registrar, Subscribe(self.cfg.node))

    def receiveMsg_StatusRequest(self, msg, sender):
        """The latest membership: the caller need not know where the registrar is now."""
        if self.membership is not None:
            self.send(sender, self.membership)

    # ------------------------------------------------------------ misc
    def receiveMsg_ActorExitRequest(self, msg: ActorExitRequest, sender):
        self._each(Request.cancel, "requester shutting down")
        if self.cfg is not None:
            self.send(self.registrar, Unsubscribe())
        self.close_data_plane()

    def receiveMsg_PoisonMessage(self, msg: PoisonMessage, sender):
        log.warning("undeliverable or failing message", message=str(msg.poisonMessage)[:200])

    def receiveUnrecognizedMessage(self, msg, sender):
        log.debug("ignored message", type=type(msg).__name__)
