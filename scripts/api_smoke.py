"""Manual smoke test of a running gateway (``make run`` first, then ``make test-api``).

Checks the index and health routes, sends a simple message and a conversation,
shows how errors look, and sends concurrent requests. Prints what it sees and
exits non-zero when something is off. Never sends traffic beyond --url.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    base = args.url.rstrip("/")
    failures = 0

    def check(label: str, ok: bool, detail: str) -> None:
        nonlocal failures
        failures += not ok
        print(f"[{'ok' if ok else 'FAIL':4}] {label}: {detail}")

    def message(messages, **extra):
        body = {"messages": messages, "max_tokens": args.max_tokens, **extra}
        return requests.post(f"{base}/llm/message", json=body, timeout=120)

    try:
        index = requests.get(base + "/", timeout=5)
    except requests.ConnectionError:
        print(f"[FAIL] nothing answers at {base}: start it with `make run`")
        return 1
    check("GET /", index.ok, f"{index.status_code} {index.json().get('service')}")

    health = requests.get(f"{base}/health", timeout=10)
    upstream = health.json().get("lm_studio", {})
    check(
        "GET /health",
        health.ok,
        f"{health.status_code} upstream={upstream.get('url')} "
        f"models={upstream.get('models')}",
    )

    started = time.perf_counter()
    simple = message([{"role": "user", "content": "Say hello in five words."}])
    body = simple.json()
    check(
        "simple message",
        simple.ok,
        f"{simple.status_code} in {time.perf_counter() - started:.2f}s "
        f"model={body.get('model')} tokens={body.get('tokens_used')} "
        f"text={body.get('response', body.get('error'))!r}",
    )

    conversation = message(
        [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "My name is Ana."},
            {"role": "assistant", "content": "Nice to meet you, Ana."},
            {"role": "user", "content": "What is my name?"},
        ]
    )
    check("conversation", conversation.ok, f"{conversation.status_code}")

    invalid = requests.post(f"{base}/llm/message", json={"messages": []}, timeout=10)
    check(
        "validation error",
        invalid.status_code == 422,
        f"{invalid.status_code} {invalid.json()['error']['code']}",
    )

    with ThreadPoolExecutor(args.concurrency) as pool:
        started = time.perf_counter()
        answers = list(
            pool.map(
                lambda i: message([{"role": "user", "content": f"Count to {i}."}]),
                range(args.concurrency),
            )
        )
    ids = {answer.headers.get("X-Correlation-ID") for answer in answers}
    check(
        f"{args.concurrency} concurrent",
        all(a.ok for a in answers) and len(ids) == args.concurrency,
        f"statuses={[a.status_code for a in answers]} "
        f"in {time.perf_counter() - started:.2f}s, {len(ids)} distinct IDs",
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
