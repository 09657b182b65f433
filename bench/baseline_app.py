"""The web stack's own ceiling, for comparison with the broker in the same run.

``bare``: parse the same form, return a fixed JSON body. ``xadd``: the same plus one Redis XADD
per request, the floor of anything that stores a record per request. Run under gunicorn with the
broker's worker settings: ``gunicorn 'bench.baseline_app:create("bare")'``.
"""

from __future__ import annotations

import os

import orjson
from flask import Flask, Response, request

BODY = orjson.dumps(
    {
        "access_token": "ya29.baseline",
        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "token_type": "Bearer",
        "expires_in": 3599,
        "scope": "https://www.googleapis.com/auth/cloud-platform",
    }
)


def create(mode: str = "bare") -> Flask:
    app = Flask(__name__)
    client = None
    if mode == "xadd":
        import redis

        client = redis.Redis.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))

    @app.post("/v1/token")
    def token() -> Response:
        form = request.form
        if form.get("grant_type") is None or form.get("subject_token") is None:
            return Response(b'{"error":"invalid_request"}', status=400, mimetype="application/json")
        if client is not None:
            client.xadd(
                "bench:audit", {"r": form["subject_token"][-16:]}, maxlen=100000, approximate=True
            )
        resp = Response(BODY, mimetype="application/json")
        resp.headers["Cache-Control"] = "no-store"
        resp.headers["Pragma"] = "no-cache"
        return resp

    return app
