"""Identifiers for requests, traces, records and leases: unique, cheap, not secret.

``uuid.uuid4`` and :mod:`secrets` ask the kernel for every id, and each such
system call hands the GIL to another thread: a keyed request made six. These
ids must be unique, not unpredictable (none of them grants anything), so they
come from this process's own generator (:class:`random.Random`), seeded from
the operating system when the module loads and again in every forked child:
two gunicorn workers never draw the same sequence. Anything secret (API keys)
keeps using :mod:`secrets`.
"""

from __future__ import annotations

import os
import random
import uuid

# A generator of our own: code that seeds the global one (a test, a library)
# cannot make two ids alike.
_generator = random.Random()  # noqa: S311 - unique ids, not secrets (see above)
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()
    _generator.seed()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def process_id() -> int:
    """This process's id, without a system call (renewed in a forked child)."""
    return _pid


def random_hex(nbytes: int) -> str:
    """``nbytes`` random bytes as lowercase hex (``2 * nbytes`` characters)."""
    return f"{_generator.getrandbits(8 * nbytes):0{2 * nbytes}x}"


def new_uuid() -> uuid.UUID:
    """A random (version 4) UUID."""
    return uuid.UUID(int=_generator.getrandbits(128), version=4)
