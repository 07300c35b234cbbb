"""Conversation affinity on two real llama.cpp servers: ``python -m bench.affinity``.

Two bundled llama-cpp-python servers (one thread each, ``slots: 1``) behind one
gateway. Conversations of ``--turns`` turns (6) whose first user turn carries
about ``--context`` tokens (1,500) of context (the bundled Gemma chat format
drops system messages, so the context is in a user turn) are played
interleaved, one turn of each in turn, with a small ``max_tokens``. Measured:
the time to the first streamed token of each turn, with conversation affinity
(``LLM_SERVICE_AFFINITY=on``) and with placement that ignores conversations
(``off``: the least loaded host, ties broken at random). A llama-cpp-python
server keeps the prompt state of the last request only, so a turn sent to the
server that served the conversation's previous turn re-reads only the new
messages, while one sent elsewhere re-reads the whole conversation.

Two scenarios: two conversations on two servers, and three on two. Printed:
mean and median time to first token of the follow-up turns (2..N; the first
turns are cold either way), for each mode, and the ratio.

    python -m bench.affinity [--turns 6] [--context 1500] [--max-tokens 8]
        [--seed 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import local_backend  # noqa: E402
from tests.servers import GatewayServer, free_port  # noqa: E402

#: Words of the context, varied so that no prompt cache short-cuts it.
_PARAGRAPH = (
    "river mountain ledger copper orchard lantern harbor violet engine meadow "
    "signal quarry thunder saddle marble canyon whistle garden beacon timber "
    "falcon glacier compass velvet anchor prairie crystal meadowlark tundra "
    "furnace island cobalt willow summit harvest pepper voyage silver granite"
)
WORDS = _PARAGRAPH.split()


def context_text(tokens: int, seed: int) -> str:
    """About ``tokens`` tokens of varied words (Gemma: about 1.07 a word)."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(int(tokens / 1.07))]
    return "Read these notes carefully. " + " ".join(words)


def first_token_time(gateway: str, model: str, messages: list, max_tokens: int):
    """Stream one turn: (seconds to the first content token, answer, host)."""
    started = time.perf_counter()
    first = None
    parts = []
    with requests.post(
        f"{gateway}/v1/chat/completions",
        json={
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        },
        stream=True,
        timeout=300,
    ) as response:
        response.raise_for_status()
        host = response.headers.get("X-Upstream-Host")
        for line in response.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    first = first or time.perf_counter() - started
                    parts.append(content)
    return (first or time.perf_counter() - started), "".join(parts), host


def play(gateway: str, model: str, conversations: int, args) -> dict:
    """Play ``conversations`` interleaved; return follow-up TTFTs and hosts."""
    chats = [
        [
            {
                "role": "user",
                "content": context_text(args.context, args.seed * 100 + n)
                + f"\n\nConversation {n}: what is the first word above?",
            }
        ]
        for n in range(conversations)
    ]
    follow_ups, firsts, hosts = [], [], []
    for turn in range(args.turns):
        for n, messages in enumerate(chats):
            seconds, answer, host = first_token_time(
                gateway, model, messages, args.max_tokens
            )
            (firsts if turn == 0 else follow_ups).append(seconds)
            hosts.append(f"c{n}t{turn}:{host}")
            messages += [
                {"role": "assistant", "content": answer or "ok"},
                {"role": "user", "content": f"Turn {turn + 2}: one more word?"},
            ]
    return {
        "follow_up_mean_s": statistics.fmean(follow_ups),
        "follow_up_median_s": statistics.median(follow_ups),
        "first_turn_mean_s": statistics.fmean(firsts),
        "hosts": hosts,
    }


def run(args) -> dict:
    python = local_backend.ensure_installed()
    local_backend.ensure_model(python)
    results: dict = {}
    with ExitStack() as stack:
        servers = []
        for _ in range(2):
            server = local_backend.LocalModelServer(
                port=free_port(), python=python, threads=1
            )
            server.start(timeout=300)
            stack.callback(server.stop)
            servers.append(server)
        upstreams = [
            {"name": f"llama-{n}", "url": server.url, "slots": 1}
            for n, server in enumerate(servers)
        ]
        for conversations in (2, 3):
            for mode in ("on", "off"):
                settings = {
                    "UPSTREAMS": json.dumps(upstreams),
                    "AFFINITY": mode,
                    "LM_STUDIO_TIMEOUT": 300,
                    "LM_STUDIO_RETRY_BUDGET": 300,
                    "STREAM_FIRST_TOKEN_TIMEOUT": 300,
                    "RATE_LIMIT_REQUESTS": 100000,
                    "MAX_REQUEST_SIZE": 1_000_000,
                }
                with GatewayServer(settings) as gateway:
                    result = play(gateway.url, servers[0].model, conversations, args)
                results[f"{conversations} conversations, affinity {mode}"] = result
                print(
                    f"{conversations} conversations on 2 servers, affinity {mode:>3}: "
                    f"follow-up TTFT mean {result['follow_up_mean_s']:.2f} s, "
                    f"median {result['follow_up_median_s']:.2f} s "
                    f"(first turns {result['first_turn_mean_s']:.2f} s)",
                    flush=True,
                )
    for conversations in (2, 3):
        on = results[f"{conversations} conversations, affinity on"]
        off = results[f"{conversations} conversations, affinity off"]
        ratio = off["follow_up_mean_s"] / on["follow_up_mean_s"]
        results[f"{conversations} conversations, ratio"] = ratio
        print(
            f"{conversations} conversations: mean follow-up TTFT "
            f"{on['follow_up_mean_s']:.2f} s with affinity vs "
            f"{off['follow_up_mean_s']:.2f} s without ({ratio:.1f}x)"
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--context", type=int, default=1500, help="tokens, about")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the results")
    args = parser.parse_args(argv)
    results = run(args)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
