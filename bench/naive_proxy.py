"""The naive proxy of issue 17: ten lines of Flask + ``requests``, nothing else.

No validation, no limits, no logs, no metrics: what a call costs when a Flask
app only forwards it. Served by the gateway's ``gunicorn.conf.py`` like
:mod:`bench.bare_flask`; ``BENCH_UPSTREAM`` is the upstream's root URL.
Below the marker, the proxy exactly as the issue writes it.
"""

import os

UPSTREAM = os.environ["BENCH_UPSTREAM"]

# -- the ten lines ---------------------------------------------------------------
import requests  # noqa: E402
from flask import Flask, Response, request  # noqa: E402

app = Flask(__name__)
S = requests.Session()


@app.post("/v1/chat/completions")
def chat():
    r = S.post(
        UPSTREAM + "/v1/chat/completions", json=request.get_json(), timeout=(2, 30)
    )
    return Response(r.content, status=r.status_code, mimetype="application/json")
