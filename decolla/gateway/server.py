"""Command line of the gateway: `python -m decolla.gateway` and `decolla serve`."""
from __future__ import annotations

import argparse
import ipaddress
import threading
import time

from decolla.gateway.access import TOKEN_ENV, resolve_token
from decolla.gateway.backends import cluster_model
from decolla.gateway.catalog import SEEDED_SPEC, cluster_first, default_catalog
from decolla.gateway.service import DEFAULT_MAX_BYTES, Gateway
from decolla.helpformat import HelpFormatter
from decolla.log import configure, get_logger
from decolla.runtime import keys


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the gateway's options to a parser (used by `decolla serve` too)."""
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (0.0.0.0 to let a phone on the LAN connect)")
    p.add_argument("--port", type=int, default=8000, help="TCP port of the page and the API")
    p.add_argument("--backend", choices=["reference", "local-cluster", "cluster"], default=None,
                   help="where inferences run: 'reference' (in this process, no cluster), "
                        "'local-cluster' (start device processes here), 'cluster' (--leader); "
                        "default: cluster if --leader is given, else reference")
    p.add_argument("--leader", default=None, help="host:port of a running cluster's leader")
    p.add_argument("--devices", type=int, default=3, help="device processes for local-cluster")
    p.add_argument("--plan", default="auto",
                   help="the cluster's plan: auto, single, layer (the paper's per-layer split), ... "
                        "(default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=20.0,
                   help="seconds the cluster gets for one inference before the answer is 503")
    p.add_argument("--connect-timeout", type=float, default=15.0,
                   help="seconds to reach a cluster's leader")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="extra model: a DeColla .npz or a torchvision .pt/.pth checkpoint "
                        "(repeatable)")
    p.add_argument("--seeded-spec", default=SEEDED_SPEC,
                   help="spec of the ImageNet-shaped seeded model ('' to leave it out)")
    p.add_argument("--no-digits", action="store_true", help="do not offer the digits model")
    p.add_argument("--max-upload-mb", "--max-mb", dest="max_upload_mb", type=float,
                   default=DEFAULT_MAX_BYTES / 2**20, help="largest accepted upload in MiB")
    p.add_argument("--token", default=None,
                   help=f"access token the page and the API require (default: ${TOKEN_ENV}; "
                        "none: anyone who reaches the port may use the gateway)")
    p.add_argument("--key-file", default=None,
                   help=f"the cluster's key file (default: ${keys.KEY_ENV}), for a cluster "
                        "started with one")
    p.add_argument("--log-json", action="store_true", help="JSON log lines")
    return p


def build_gateway(args: argparse.Namespace) -> Gateway:
    """A Gateway from parsed options."""
    extra = {}
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--model expects NAME=PATH, got {item!r}")
        extra[name] = path
    catalog = default_catalog(extra, seeded_spec=args.seeded_spec,
                              include_digits=not args.no_digits)
    backend = args.backend or ("cluster" if args.leader else "reference")
    if backend == "cluster" and args.leader:
        catalog = _cluster_model_first(catalog, args.leader, args.connect_timeout)
    return Gateway(catalog, backend=backend, leader=args.leader, devices=args.devices,
                   max_bytes=int(args.max_upload_mb * 2**20), request_timeout=args.request_timeout,
                   connect_timeout=args.connect_timeout, plan=args.plan)


def _cluster_model_first(catalog: dict, leader: str, timeout: float) -> dict:
    """The cluster's model as the default (asked of its leader); the catalogue unchanged,
    with a warning, when the leader cannot be asked or its model cannot be loaded here."""
    log = get_logger("gateway")
    try:
        spec, digest = cluster_model(leader, timeout)
        catalog = cluster_first(catalog, spec, digest)
    except Exception as exc:     # the gateway starts even when the cluster is down
        log.warning("cannot use the cluster's model as the default", leader=leader,
                    error=str(exc))
        return catalog
    log.info("the cluster's model is the default", model=next(iter(catalog)), spec=spec,
             digest=digest[:12])
    return catalog


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    import uvicorn  # uvicorn and Starlette load only to serve: `decolla status` needs neither

    from decolla.gateway.app import create_app
    configure(json=args.log_json, component="gateway")
    log = get_logger("gateway")
    try:
        key = keys.load_key(args.key_file)
    except keys.ClusterKeyError as exc:
        raise SystemExit(f"decolla serve: {exc}") from None
    if key is not None:
        keys.install(key)  # before any backend reaches the cluster
    token = resolve_token(args.token)
    if token is None and not _is_loopback(args.host):
        log.warning("the gateway listens beyond this machine WITHOUT an access token: anyone who "
                    f"reaches {args.host}:{args.port} can use it; set --token or ${TOKEN_ENV}")
    gateway = build_gateway(args)
    log.info("serving", url=f"http://{args.host}:{args.port}/", backend=gateway.backend_kind,
             models=list(gateway.catalog), token=token is not None,
             cluster_key=keys.installed() is not None)
    uvicorn.run(create_app(gateway, token), host=args.host, port=args.port, log_level="warning",
                access_log=False, timeout_graceful_shutdown=2)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m decolla.gateway`."""
    p = argparse.ArgumentParser(prog="python -m decolla.gateway",
                                description="DeColla requester gateway: web page, JSON API, "
                                            "live cluster view",
                                formatter_class=HelpFormatter)
    return run(add_arguments(p).parse_args(argv))


class ServerThread:
    """The gateway served by uvicorn in a background thread (tests, embedding); port 0 = any free."""

    def __init__(self, gateway: Gateway, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None):
        import uvicorn

        from decolla.gateway.app import create_app
        config = uvicorn.Config(create_app(gateway, token), host=host, port=port, log_level="warning",
                                access_log=False, timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.gateway = gateway
        self.thread = threading.Thread(target=self.server.run, name="gateway", daemon=True)
        self.host = host

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway server did not start")
            time.sleep(0.02)
        return self

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}"

    def __exit__(self, *exc) -> None:
        self.gateway.hub.close()  # ends open event streams so the server can stop at once
        self.server.should_exit = True
        self.thread.join(timeout=10)
