"""The cluster key: one secret shared by every node, client and gateway of a cluster.

Whoever holds it may join the cluster and send it work; whoever does not cannot get a
single frame parsed. This module reads, writes and derives it and nothing else. The
framings that use it are the data plane's (decolla.runtime.frames) and Thespian's
(decolla.runtime.thespian_auth). Each gets its own subkey, so a tag made for one framing
is never valid in the other.

A key file holds 64 hex digits (32 random bytes) and a newline. `decolla keygen` writes
one, readable by its owner only. A node takes `--key-file`, or the file named by
DECOLLA_KEY_FILE.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat

KEY_ENV = "DECOLLA_KEY_FILE"
KEY_BYTES = 32


class ClusterKeyError(ValueError):
    """A key file that is missing, unreadable, malformed or readable by others."""


def generate() -> bytes:
    """A new random cluster key."""
    return secrets.token_bytes(KEY_BYTES)


def write_key(path: str, key: bytes | None = None, overwrite: bool = False) -> bytes:
    """Write `key` (a new one if None) to `path` with mode 0600; return it.

    Refuses to replace an existing file unless `overwrite`: losing a cluster's key
    silently would lock every node out.
    """
    key = generate() if key is None else key
    if len(key) != KEY_BYTES:
        raise ClusterKeyError(f"a cluster key has {KEY_BYTES} bytes, not {len(key)}")
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise ClusterKeyError(f"{path} exists; pass --force to replace it") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
    os.chmod(path, 0o600)
    return key


def read_key(path: str) -> bytes:
    """The key in `path`, with a clear error for each way a key file can be wrong."""
    try:
        info = os.stat(path)
        with open(path, encoding="ascii") as fh:
            text = fh.read().strip()
    except FileNotFoundError:
        raise ClusterKeyError(f"key file {path} does not exist (make one: decolla keygen {path})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ClusterKeyError(f"cannot read key file {path}: {exc}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ClusterKeyError(f"key file {path} is readable by others (mode "
                              f"{stat.S_IMODE(info.st_mode):o}); chmod 600 {path}")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ClusterKeyError(f"key file {path} must hold {2 * KEY_BYTES} hex digits "
                              "(written by decolla keygen)")
    return key


def key_path(path: str | None = None) -> str | None:
    """The key file to use: `path` if given, else DECOLLA_KEY_FILE, else None."""
    return path or os.environ.get(KEY_ENV) or None


def load_key(path: str | None = None) -> bytes | None:
    """The cluster key from `path` or DECOLLA_KEY_FILE; None if neither names a file."""
    chosen = key_path(path)
    return read_key(chosen) if chosen else None


def subkey(key: bytes, purpose: str) -> bytes:
    """A key for one purpose (one framing), derived from the cluster key."""
    return hmac.new(key, b"decolla/" + purpose.encode(), hashlib.sha256).digest()


# The key this process speaks with. Process-wide because Thespian's serializer is a
# module global of its transport, and because the actor processes Thespian forks inherit
# it: a node, client or gateway installs its key once, before its actor system starts.
_installed: bytes | None = None


def install(key: bytes | None) -> None:
    """Make `key` this process's cluster key (None: no key, loopback-only clusters)."""
    global _installed
    if key is not None and len(key) != KEY_BYTES:
        raise ClusterKeyError(f"a cluster key has {KEY_BYTES} bytes, not {len(key)}")
    _installed = key


def installed() -> bytes | None:
    """This process's cluster key, or None."""
    return _installed
