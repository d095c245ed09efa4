"""The requester side for people: an HTTP gateway with a camera/upload page, a JSON API and a
live view of the cluster (see docs/GATEWAY.md). `python -m decolla.gateway` or `decolla serve`."""
from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run the gateway server from command-line arguments."""
    from decolla.gateway.server import main as _main
    return _main(argv)
