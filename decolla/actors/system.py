"""Starting and joining a DeColla actor system (Thespian multiprocTCPBase).

Convention timing is shortened on every node so that a vanished member is
dropped within seconds (Thespian's default is ~22 minutes); both the
re-registration and restart periods must be short, or healthy members get
dropped. These are module-level settings read by the admin process, which is
forked from the process that starts the system.

Every system starts in `start_system`, which first makes this process's Thespian speak
with the cluster key (decolla.runtime.thespian_auth) and bind where it advertises: the
admin and actor processes are forked (never spawned) so that they inherit both.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
import uuid
from datetime import timedelta

from thespian.actors import Actor, ActorSystem, InvalidActorAddress
from thespian.system.admin import convention
from thespian.system.messages.status import Thespian_StatusReq
from thespian.system.transport.IPBase import IPActorAddress

from decolla.log import get_logger
from decolla.runtime import thespian_auth

log = get_logger("system")
SYSTEM_BASE = "multiprocTCPBase"
REGISTRAR_NAME = "decolla-registrar"
EXIT_NO_ACTOR_SYSTEM = 3         # decolla.node's exit status when its actor system cannot start
CONVENTION_PERIOD_S = 1          # re-registration period; a member is dropped after ~3 periods

# capability keys
CAP_NODE = "decolla.node"
CAP_ROLE = "decolla.role"
CAP_DIGEST = "decolla.digest"
CAP_MODEL = "decolla.model"
CAP_THREADS = "decolla.threads"
CAP_COMPUTE = "decolla.compute"
CAP_STARTED = "decolla.started"  # unique per actor system: tells a restarted node from a returning one


def tune_convention(period_s: int = CONVENTION_PERIOD_S) -> None:
    """Shorten Thespian's convention timers in this process (and the admins it forks)."""
    value = f"0:{int(period_s)}"
    os.environ["CONVENTION_REREGISTRATION_PERIOD"] = value
    os.environ["CONVENTION_RESTART_PERIOD"] = value
    convention.CONVENTION_REREGISTRATION_PERIOD = timedelta(seconds=period_s)
    convention.CONVENTION_RESTART_PERIOD = timedelta(seconds=period_s)


class ShutdownNoise(logging.Filter):
    """Drops Thespian's "Pending Actor create ... failed (3585)" (0xE01: the actor system is
    shutting down). The leader's admin keeps a record of every create it forwards to a
    device (a Worker: the device answers the registrar directly, so the record stays) and,
    shutting down, fails them all, the long-running workers included: one ERROR line per
    device on every clean shutdown. A create that really fails has another code."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith("Pending Actor create") and "failed (3585)" in text)


def thespian_log_defs(level: int = logging.WARNING) -> dict:
    """logging dictConfig for Thespian's own logger actor (never pass False: breaks 4.0.1)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s thespian %(levelname)s %(message)s"}},
        "filters": {"shutdown": {"()": f"{__name__}.ShutdownNoise"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain",
                                "level": level, "filters": ["shutdown"]}},
        "root": {"handlers": ["stderr"], "level": level},
    }


def capabilities(role: str, name: str, port: int, leader: str | None = None,
                 digest: str = "", model: str = "", threads: int = 1,
                 compute: bool = False) -> dict:
    """Capabilities a node announces to the convention."""
    caps = {"Admin Port": int(port), CAP_ROLE: role, CAP_NODE: name, CAP_DIGEST: digest,
            CAP_MODEL: model, CAP_THREADS: int(threads), CAP_COMPUTE: bool(compute),
            CAP_STARTED: uuid.uuid4().hex}
    if leader:
        caps["Convention Address.IPv4"] = leader
    return caps


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on `host` (taken again by anyone who binds it first)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) is this machine's loopback interface."""
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def route_ip(host: str) -> str:
    """This machine's address on the route to `host` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def system_host(bind: str | None, leader: str | None = None) -> str:
    """The one address a system listens on and advertises: `bind`, else this machine's
    address toward the `leader` (HOST:PORT), else loopback."""
    if bind:
        return bind
    return route_ip(parse_hostport(leader)[0]) if leader else "127.0.0.1"


def _advertised_bind_args(self):
    return (self.sockname,)


def bind_where_advertised() -> None:
    """Make Thespian bind each listening socket to the address it advertises.

    Thespian binds an address meant for others ("external") to ('', port), every
    interface, whatever THESPIAN_BASE_IPADDR says; its advertised `sockname` is the
    interface asked for, so binding that keeps every socket of a node on --host."""
    IPActorAddress.bindArgs = property(_advertised_bind_args)


def start_system(caps: dict, bind: str | None = None):
    """Start this node's actor system with `caps` (a new, unique admin on its port), on
    the one interface `system_host` names, its frames tagged with the installed key.

    An "Admin Port" of 0 means a free port, picked again, up to 3 tries, when it was taken
    before the admin bound it (e.g. as the local end of another connection): that raises
    InvalidActorAddress."""
    bind = system_host(bind, caps.get("Convention Address.IPv4"))
    os.environ["THESPIAN_BASE_IPADDR"] = bind
    thespian_auth.install()
    bind_where_advertised()
    caps = {**caps, "Process Startup Method": "fork"}
    tune_convention()
    pick = not caps.get("Admin Port")
    tries = 3 if pick else 1
    for attempt in range(tries):
        if pick:
            caps = {**caps, "Admin Port": free_port(bind)}
        try:
            return ActorSystem(SYSTEM_BASE, caps, logDefs=thespian_log_defs(),
                               transientUnique=True)
        except InvalidActorAddress:
            if attempt == tries - 1:
                raise
            log.warning("actor system port taken; trying another", port=caps["Admin Port"])


def no_leader(leader: str, timeout: float) -> str:
    """What it means when a leader does not answer (an error message)."""
    return (f"no DeColla leader answered at {leader} within {timeout:.0f} s: is it running "
            "and reachable, and does it use the same cluster key (--key-file)?")


def in_convention(asys) -> bool:
    """Whether this system's admin has heard back from its convention leader; a member the
    leader cannot hear (another cluster key) never has. Asks the admin, so unlike a
    createActor it cannot block while the leader is away."""
    status = asys.ask(asys._systemBase.adminAddr, Thespian_StatusReq(), 5)
    return bool(getattr(status, "conventionAttendees", None))


def wait_joined(asys, leader: str, timeout: float, stopped=lambda: False) -> bool:
    """Block until this system has joined `leader`'s convention (True) or `stopped()` says
    to give up (False, so the caller still shuts its system down); TimeoutError after
    `timeout`."""
    deadline = time.monotonic() + timeout
    while not in_convention(asys):
        if stopped():
            return False
        if time.monotonic() > deadline:
            raise TimeoutError(no_leader(leader, timeout))
        time.sleep(0.2)
    return True


def on_named_node(capabilities: dict, requirements: dict) -> bool:
    """Capability check placing an actor on the node its requirements name (anywhere if none)."""
    want = requirements.get(CAP_NODE)
    return want is None or capabilities.get(CAP_NODE) == want


def parse_hostport(value: str) -> tuple[str, int]:
    """'host:port' -> (host, port) with a clear error."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def proc_info() -> dict:
    """pid and process group of this actor process (the group holds the node's whole actor system)."""
    return {"pid": os.getpid(), "pgid": os.getpgid(0), "ppid": os.getppid()}


class ProcessInfoActor(Actor):
    """Answers "who" with proc_info(): lets a node report the process group of its admin."""

    def receiveMessage(self, msg, sender):
        if msg == "who":
            self.send(sender, proc_info())
