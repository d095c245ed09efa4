"""Registrar: the leader's membership actor.

It learns about nodes from Thespian convention updates, refuses nodes whose model
digest differs from the leader's, creates one Worker on every accepted device
(placed there by capability), tracks heartbeats (free CPU, queue length) and
pushes `Membership` snapshots to subscribed requesters.
"""
from __future__ import annotations

import time
import uuid

from thespian.actors import (ActorExitRequest, ActorSystemConventionUpdate,
                             ActorTypeDispatcher, ChildActorExited,
                             PoisonMessage, WakeupMessage)

from decolla.actors import system
from decolla.actors.preload import get_model
from decolla.actors.worker import Worker
from decolla.log import get_logger
from decolla.runtime.messages import (ConfigureRegistrar, DeviceInfo, FindRegistrar, Heartbeat,
                                      InFlight, InitWorker, Membership, RegistrarAt,
                                      StatusRequest, Subscribe, WorkerReady, WorkerRefused)

log = get_logger("registrar")
RESTART_WORKER_S = 2.0
KEPT_WORKER_WAIT_S = 10.0     # a worker kept across a convention re-join must beat by then
KEEPALIVE_S = 1.0             # subscribers hear at least this often: silence means a lost leader


class Registrar(ActorTypeDispatcher):
    """Membership of the collaboration (one per cluster, on the leader)."""

    @staticmethod
    def actorSystemCapabilityCheck(capabilities, requirements):
        return capabilities.get(system.CAP_ROLE) == "leader"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.configured = False
        self.devices: dict[str, DeviceInfo] = {}
        self.caps: dict[str, dict] = {}           # node -> capabilities
        self.admins: dict[str, object] = {}       # node -> admin address
        self.last_beat: dict[str, float] = {}
        self.worker_started: dict[str, float] = {}
        self.refused: dict[str, str] = {}
        self.subscribers: list = []               # [address, node name, requests in flight]
        self.restart: set[str] = set()            # devices whose worker exited
        self.kept: dict[str, float] = {}          # device -> when its worker was kept on re-join
        self.dirty = False
        self.pushed = 0.0

    # ------------------------------------------------------------ set-up
    def receiveMsg_ConfigureRegistrar(self, msg: ConfigureRegistrar, sender):
        if self.configured:
            self.send(sender, self._membership())
            return
        self.cfg = msg
        self.model = get_model(msg.model_spec)
        self.digest = self.model.digest()
        self.specs = self.model.layer_specs()
        self.configured = True
        self.notifyOnSystemRegistrationChanges(True)
        self.wakeupAfter(msg.heartbeat_s, payload="check")
        log.info("registrar ready", model=msg.model_spec, digest=self.digest[:12])
        if msg.local_caps and msg.local_caps.get(system.CAP_COMPUTE):
            self.caps[msg.node] = msg.local_caps
            self._start_worker(msg.node)
        self.send(sender, self._membership())

    def receiveMsg_ActorSystemConventionUpdate(self, msg: ActorSystemConventionUpdate, sender):
        caps = msg.remoteCapabilities or {}
        name = caps.get(system.CAP_NODE)
        role = caps.get(system.CAP_ROLE)
        if not name:
            return
        if not msg.remoteAdded:
            self._node_left(name, role)
            return
        if role == "requester" or not caps.get(system.CAP_COMPUTE):
            return
        known = self.devices.get(name)
        same_system = (known is not None and self.admins.get(name) == msg.remoteAdminAddress
                       and self.caps.get(name, {}).get(system.CAP_STARTED)
                       == caps.get(system.CAP_STARTED))
        if same_system and known.status != "gone":
            return                          # periodic re-registration of a known device
        if caps.get(system.CAP_DIGEST) != self.digest:
            reason = (f"model digest {str(caps.get(system.CAP_DIGEST))[:12]} differs from the "
                      f"leader's {self.digest[:12]} (model {caps.get(system.CAP_MODEL)!r})")
            if self.refused.get(name) != reason:
                log.warning("node refused", node=name, reason=reason)
            self.refused[name] = reason
            self.dirty = True
            return
        self.refused.pop(name, None)
        if same_system and known.worker is not None and name not in self.restart:
            # Dropped for missed check-ins (on a slow link they can wait behind chunk traffic)
            # and back: the same actor system, whose worker kept running. It is ready again
            # with its next heartbeat, and replaced if none comes.
            known.status = "unresponsive"
            self.kept[name] = time.monotonic()
            log.info("device back; keeping its worker", node=name)
            self.dirty = True
            return
        self.caps[name] = caps
        self.admins[name] = msg.remoteAdminAddress
        self._start_worker(name)

    def _start_worker(self, name: str) -> None:
        caps = self.caps[name]
        old = self.devices.get(name)
        if old is not None and old.worker is not None:
            self.send(old.worker, ActorExitRequest())
        worker = self.createActor(Worker, targetActorRequirements={system.CAP_NODE: name})
        self.devices[name] = DeviceInfo(name=name, worker=worker, status="starting",
                                        threads=int(caps.get(system.CAP_THREADS, 1)),
                                        incarnation=uuid.uuid4().hex[:12])
        self.worker_started[name] = time.monotonic()
        self.send(worker, InitWorker(name, caps.get(system.CAP_MODEL, ""), self.digest,
                                     self.cfg.heartbeat_s, int(caps.get(system.CAP_THREADS, 1))))
        log.info("device joined", node=name)
        self.dirty = True

    def _node_left(self, name: str, role) -> None:
        self.subscribers = [s for s in self.subscribers if s[1] != name]
        self.restart.discard(name)
        dev = self.devices.get(name)
        if dev is not None and dev.status != "gone":
            dev.status = "gone"
            log.warning("device left the convention", node=name)
            self.dirty = True
            self._push()
        self.refused.pop(name, None)

    # ------------------------------------------------------------ workers
    def receiveMsg_WorkerReady(self, msg: WorkerReady, sender):
        dev = self.devices.get(msg.name)
        if dev is None or dev.worker != sender:
            return
        dev.status, dev.speed, dev.pid, dev.pgid = "ready", msg.speed, msg.pid, msg.pgid
        dev.host, dev.threads, dev.data_addr = msg.host, msg.threads, tuple(msg.data_addr)
        self.last_beat[msg.name] = time.monotonic()
        log.info("device ready", node=msg.name, speed_gmacs=round(msg.speed / 1e9, 2),
                 pid=msg.pid)
        self.dirty = True
        self._push()

    def receiveMsg_WorkerRefused(self, msg: WorkerRefused, sender):
        log.warning("node refused", node=msg.name, reason=msg.reason)
        self.refused[msg.name] = msg.reason
        dev = self.devices.pop(msg.name, None)
        if dev is not None and dev.worker is not None:
            self.send(dev.worker, ActorExitRequest())
        self.dirty = True
        self._push()

    def receiveMsg_Heartbeat(self, msg: Heartbeat, sender):
        dev = self.devices.get(msg.name)
        if dev is None or dev.worker != sender:
            return
        self.last_beat[msg.name] = time.monotonic()
        dev.beats += 1
        dev.available, dev.queue = msg.available, msg.queue
        self.kept.pop(msg.name, None)
        if dev.status == "unresponsive":
            dev.status = "ready"
            log.info("device responsive again", node=msg.name)
            self._push()
        self.dirty = True

    def receiveMsg_ChildActorExited(self, msg: ChildActorExited, sender):
        for name, dev in self.devices.items():
            if dev.worker == msg.childAddress and dev.status != "gone":
                log.warning("worker exited", node=name)
                dev.status = "unresponsive"
                self._push()
                self.restart.add(name)    # on the next check, if the node is still a member
                return

    # ------------------------------------------------------------ timer
    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender):
        if msg.payload != "check":
            return
        now = time.monotonic()
        for name, since in list(self.kept.items()):
            if now - since > KEPT_WORKER_WAIT_S:
                del self.kept[name]
                if self.devices[name].status == "unresponsive":
                    log.warning("kept worker is silent; restarting it", node=name)
                    self._start_worker(name)
        for name in list(self.restart):
            dev = self.devices.get(name)
            if dev is None or dev.status == "gone":
                self.restart.discard(name)
            elif now - self.worker_started.get(name, 0) > RESTART_WORKER_S:
                self.restart.discard(name)
                log.info("restarting worker", node=name)
                self._start_worker(name)
        for name, dev in self.devices.items():
            if dev.status == "ready" and now - self.last_beat.get(name, now) > \
                    self.cfg.unresponsive_s:
                dev.status = "unresponsive"
                log.warning("device unresponsive (no heartbeat)", node=name,
                            silent_s=round(now - self.last_beat[name], 2))
                self.dirty = True
            if dev.status == "starting" and now - self.worker_started.get(name, now) > 60:
                log.warning("worker did not start in 60 s; retrying", node=name)
                self._start_worker(name)
        if self.dirty or now - self.pushed > KEEPALIVE_S:
            self._push()
        self.wakeupAfter(self.cfg.heartbeat_s, payload="check")

    # ------------------------------------------------------------ clients
    def receiveMsg_Subscribe(self, msg: Subscribe, sender):
        if not any(s[0] == sender for s in self.subscribers):
            self.subscribers.append([sender, msg.node, 0])
        if self.configured:
            self.send(sender, self._membership())

    def receiveMsg_InFlight(self, msg: InFlight, sender):
        for sub in self.subscribers:
            if sub[0] == sender and sub[2] != msg.count:
                sub[2] = msg.count
                self.dirty = True          # pushed with the next check, not per request

    def receiveMsg_Unsubscribe(self, msg, sender):
        self.subscribers = [s for s in self.subscribers if s[0] != sender]

    def receiveMsg_StatusRequest(self, msg, sender):
        if self.configured:
            self.send(sender, self._membership())

    def receiveMsg_FindRegistrar(self, msg: FindRegistrar, sender):
        self.send(msg.reply_to or sender, RegistrarAt(self.myAddress))
        if msg.reply_to is not None:
            self.send(sender, ActorExitRequest())     # the RegistrarFinder that asked

    def receiveMsg_PoisonMessage(self, msg: PoisonMessage, sender):
        log.warning("message could not be handled", message=str(msg.poisonMessage)[:200])


    def receiveMsg_ActorExitRequest(self, msg, sender):
        for dev in self.devices.values():
            if dev.worker is not None:
                self.send(dev.worker, ActorExitRequest())

    def receiveUnrecognizedMessage(self, msg, sender):
        log.debug("ignored message", type=type(msg).__name__)

    # ------------------------------------------------------------ helpers
    def _membership(self) -> Membership:
        devices = [DeviceInfo(**{k: getattr(d, k) for k in d.__dataclass_fields__})
                   for d in self.devices.values()]
        return Membership(devices, self.digest, self.cfg.model_spec, self.specs,
                          tuple(self.model.input_shape), dict(self.refused),
                          {node: n for _, node, n in self.subscribers if n})

    def _push(self) -> None:
        self.dirty, self.pushed = False, time.monotonic()
        if not self.subscribers:
            return
        snap = self._membership()
        for addr, *_ in self.subscribers:
            self.send(addr, snap)


class RegistrarFinder(ActorTypeDispatcher):
    """Made on the leader by a requester that no longer hears its registrar (the leader
    restarted): answers with the current registrar and exits. A lookup by global name in
    the requester's own actor system would not do: its admin keeps the first address it
    learnt for the name for good."""

    actorSystemCapabilityCheck = Registrar.actorSystemCapabilityCheck

    def receiveMsg_FindRegistrar(self, msg: FindRegistrar, sender):
        # the registrar answers (and stops this finder): the address a global-name lookup
        # returns here is known only once the leader's admin has answered
        self.send(find_registrar(self), FindRegistrar(sender))


def find_registrar(asys):
    """Address of the leader's registrar (created on the leader under a global name)."""
    return asys.createActor(Registrar, targetActorRequirements={system.CAP_ROLE: "leader"},
                            globalName=system.REGISTRAR_NAME)


def wait_for_registrar(asys, leader: str, timeout: float, error=TimeoutError):
    """Address of the leader's registrar once it answers a status request; `error` after
    `timeout`. Waits to be in the leader's convention first: asking for the registrar
    before that blocks ~50 s in Thespian."""
    deadline = time.monotonic() + timeout
    try:
        system.wait_joined(asys, leader, timeout)
    except TimeoutError as exc:
        raise error(str(exc)) from None
    last = None
    while time.monotonic() < deadline:
        try:
            addr = find_registrar(asys)
            with asys.private() as ctx:
                if isinstance(ctx.ask(addr, StatusRequest(), 5), Membership):
                    return addr
        except Exception as exc:  # not yet in the convention, or leader not up yet
            last = exc
        time.sleep(0.2)
    raise error(system.no_leader(leader, timeout) + (f" ({last})" if last else ""))
