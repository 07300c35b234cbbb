"""``make run`` (scripts/run_gateway.py): what it checks before it serves."""

from __future__ import annotations

import importlib.util
import os
import socket
import types

import pytest

from tests.fakes.lmstudio import FakeLMStudio
from tests.servers import ROOT, free_port


@pytest.fixture
def run_gateway(monkeypatch):
    """The script as a module; gunicorn and the bundled server never start."""
    spec = importlib.util.spec_from_file_location(
        "run_gateway", ROOT / "scripts" / "run_gateway.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    started = []

    def fake_gunicorn(command, **_kwargs):
        started.append(command)
        return types.SimpleNamespace(wait=lambda: 0, terminate=lambda: None)

    def no_bundled_server(url):
        raise AssertionError(f"the bundled server was started at {url}")

    monkeypatch.setattr(module.subprocess, "Popen", fake_gunicorn)
    monkeypatch.setattr(module, "start_local_backend", no_bundled_server)
    monkeypatch.setattr(module.signal, "signal", lambda *_: None)
    monkeypatch.setenv("LLM_SERVICE_ENV_FILE", os.devnull)
    monkeypatch.setenv("GUNICORN_BIND", f"127.0.0.1:{free_port()}")
    module.gunicorn_started = started
    return module


def test_refuses_to_start_pointed_at_itself(run_gateway, monkeypatch, capsys):
    port = free_port()
    monkeypatch.setenv("GUNICORN_BIND", f"127.0.0.1:{port}")
    monkeypatch.setenv("LLM_SERVICE_LM_STUDIO_URL", f"http://localhost:{port}")
    assert run_gateway.main() == run_gateway.EXIT_CONFIG
    _, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1
    assert "own address" in err
    assert run_gateway.gunicorn_started == []


def test_says_which_process_holds_the_port_before_announcing(
    run_gateway, monkeypatch, capsys
):
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        monkeypatch.setenv("GUNICORN_BIND", f"127.0.0.1:{port}")
        monkeypatch.setenv("LLM_SERVICE_LM_STUDIO_URL", f"http://127.0.0.1:{port + 1}")
        assert run_gateway.main() == run_gateway.EXIT_PORT_BUSY
    out, err = capsys.readouterr()
    assert f"port {port} is in use by" in err
    assert f"(pid {os.getpid()})" in err
    assert "llm-service on http://" not in out
    assert run_gateway.gunicorn_started == []


def test_a_token_error_never_starts_the_bundled_server(
    run_gateway, monkeypatch, capsys
):
    with FakeLMStudio(api_token="secret") as lmstudio:
        monkeypatch.setenv("LLM_SERVICE_LM_STUDIO_URL", lmstudio.url)
        assert run_gateway.main() == 0
    out, _ = capsys.readouterr()
    assert "LLM_SERVICE_LM_STUDIO_API_TOKEN" in out
    assert "not a model server" not in out
    assert len(run_gateway.gunicorn_started) == 1


def test_a_wrong_path_is_named_not_papered_over(run_gateway, monkeypatch, capsys):
    with FakeLMStudio(lmstudio=False) as llama_cpp:
        monkeypatch.setenv("LLM_SERVICE_LM_STUDIO_URL", f"{llama_cpp.url}/api")
        assert run_gateway.main() == 0
    out, _ = capsys.readouterr()
    assert "not as an OpenAI-compatible model server" in out


def test_nothing_listening_starts_the_bundled_model_with_a_warning(
    run_gateway, monkeypatch, capsys
):
    started = []
    stub = types.SimpleNamespace(stop=lambda: None)
    monkeypatch.setattr(
        run_gateway, "start_local_backend", lambda url: started.append(url) or stub
    )
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("LLM_SERVICE_LM_STUDIO_URL", url)
    assert run_gateway.main() == 0
    out, _ = capsys.readouterr()
    assert started == [url]
    assert "plumbing test, not a useful assistant" in out
    assert out.index("plumbing test") < out.index("llm-service on http://")


def test_local_backend_off_starts_nothing(run_gateway, monkeypatch, capsys):
    monkeypatch.setenv("LLM_SERVICE_LM_STUDIO_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("LLM_SERVICE_LOCAL_BACKEND", "off")
    assert run_gateway.main() == 0
    out, _ = capsys.readouterr()
    assert "LLM_SERVICE_LOCAL_BACKEND=off" in out


def test_a_bad_local_backend_value_is_a_config_error(run_gateway, monkeypatch, capsys):
    monkeypatch.setenv("LLM_SERVICE_LOCAL_BACKEND", "sometimes")
    assert run_gateway.main() == run_gateway.EXIT_CONFIG
    _, err = capsys.readouterr()
    assert "LLM_SERVICE_LOCAL_BACKEND" in err
    assert run_gateway.gunicorn_started == []


def test_every_host_is_probed_and_named(run_gateway, monkeypatch, capsys):
    import json

    nobody = f"http://127.0.0.1:{free_port()}"
    with FakeLMStudio() as lmstudio:
        hosts = [
            {"name": "first", "url": lmstudio.url},
            {"name": "second", "url": nobody},
        ]
        monkeypatch.setenv("LLM_SERVICE_UPSTREAMS", json.dumps(hosts))
        monkeypatch.delenv("LLM_SERVICE_LM_STUDIO_URL", raising=False)
        assert run_gateway.main() == 0
    out, _ = capsys.readouterr()
    assert f"host first: using the model server at {lmstudio.url}" in out
    assert f"host second: the model server at {nobody} cannot be used" in out
    assert len(run_gateway.gunicorn_started) == 1  # no bundled server either


def test_no_host_may_be_the_gateway_itself(run_gateway, monkeypatch, capsys):
    import json

    port = free_port()
    monkeypatch.setenv("GUNICORN_BIND", f"127.0.0.1:{port}")
    hosts = [
        {"name": "first", "url": f"http://127.0.0.1:{free_port()}"},
        {"name": "second", "url": f"http://localhost:{port}"},
    ]
    monkeypatch.setenv("LLM_SERVICE_UPSTREAMS", json.dumps(hosts))
    monkeypatch.delenv("LLM_SERVICE_LM_STUDIO_URL", raising=False)
    assert run_gateway.main() == run_gateway.EXIT_CONFIG
    _, err = capsys.readouterr()
    assert "own address" in err
