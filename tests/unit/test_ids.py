"""Request-scoped ids (llm_service/ids.py): unique, and no system call each."""

from __future__ import annotations

import os
import random
import re

import pytest

from llm_service import ids
from tests.fakes.lmstudio import FakeLMStudio

CHAT = {"model": "loaded-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def fake():
    with FakeLMStudio(models=["loaded-model"], loaded=["loaded-model"]) as server:
        yield server


def test_shapes():
    assert re.fullmatch("[0-9a-f]{16}", ids.random_hex(8))
    assert re.fullmatch("[0-9a-f]{32}", ids.random_hex(16))
    assert ids.new_uuid().version == 4
    assert len({ids.random_hex(16) for _ in range(10_000)}) == 10_000


def test_uuid_text_is_a_version_4_uuid_as_str_gives_it(monkeypatch):
    import uuid

    monkeypatch.setattr(ids, "_generator", random.Random(17))
    expected = [str(ids.new_uuid()) for _ in range(100)]
    monkeypatch.setattr(ids, "_generator", random.Random(17))
    assert [ids.new_uuid_text() for _ in range(100)] == expected
    parsed = uuid.UUID(expected[0])
    assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)


def test_seeding_the_global_generator_makes_no_two_ids_alike():
    random.seed(7)
    first = ids.random_hex(16)
    random.seed(7)
    assert ids.random_hex(16) != first


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_worker_draws_its_own_ids():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, ids.random_hex(16).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert child != ids.random_hex(16)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_the_process_id_is_kept_and_a_forked_child_has_its_own(monkeypatch):
    assert ids.process_id() == os.getpid()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, f"{ids.process_id()} {os.getpid()}".encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    kept, actual = os.read(read, 64).decode().split()
    os.close(read)
    assert kept == actual == str(pid)
    # No system call once kept.
    monkeypatch.setattr(os, "getpid", lambda: pytest.fail("asked the kernel"))
    assert ids.process_id() != int(kept)


def test_a_request_asks_the_kernel_for_no_randomness(app_factory, fake, monkeypatch):
    """Each ``os.urandom`` call is a system call that hands the GIL over."""
    app = app_factory(LM_STUDIO_URL=fake.url)
    client = app.test_client()
    client.post("/v1/chat/completions", json=CHAT)  # warm: whatever starts once

    def no_kernel(size: int) -> bytes:
        raise AssertionError("os.urandom on the request path")

    monkeypatch.setattr(os, "urandom", no_kernel)
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert response.headers["X-Correlation-ID"]
    assert fake.requests[-1].headers["traceparent"]
