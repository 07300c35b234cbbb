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
import time
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


#: A version 4 UUID's fixed bits: version 4, variant 0b10 (RFC 9562).
_UUID4_CLEAR = ~(0xF000 << 64 | 0xC000 << 48)
_UUID4_SET = 0x4000 << 64 | 0x8000 << 48


def new_uuid_text() -> str:
    """``str(new_uuid())`` without building the :class:`uuid.UUID` (a fifth the CPU)."""
    digits = f"{_generator.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET:032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def new_uuid7_hex() -> str:
    """A version 7 UUID (RFC 9562) in hex: 32 digits, ordered by time.

    For a table's primary key: each new row goes in at the end of its index
    (a usage record's, see :mod:`.usage`). With random ids each went to
    another place of it, so a batch touched a page of a large table per row
    (three times the writer's CPU per record at 200,000 records).
    """
    bits = _generator.getrandbits(74)
    # 48 bits of Unix milliseconds, version 7, 12 random bits, variant 0b10,
    # 62 random bits.
    return (
        f"{time.time_ns() // 1_000_000:012x}7{bits >> 62:03x}"
        f"{bits & (1 << 62) - 1 | 1 << 63:016x}"
    )
