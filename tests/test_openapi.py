"""/openapi.json stays true: every served endpoint is documented, nothing undocumented is served."""

from __future__ import annotations

from broker.openapi import OPERATIONS, registered_operations


def test_every_registered_endpoint_is_documented(broker):
    for path, methods in registered_operations(broker.app).items():
        assert path in OPERATIONS, f"{path} is served but not in broker/openapi.py"
        for method in methods:
            assert method in OPERATIONS[path], f"{method.upper()} {path} is not documented"


def test_spec_lists_exactly_what_is_served(broker):
    spec = broker.client.get("/openapi.json").json
    assert spec["openapi"].startswith("3.")
    served = registered_operations(broker.app)
    assert set(spec["paths"]) == set(served)
    for path, ops in spec["paths"].items():
        assert set(ops) == served[path]
    assert spec["paths"]["/v1/token"]["post"]["responses"]["200"]


def test_token_response_schema_matches_a_real_response(broker):
    import jsonschema

    from tests.support import exchange_form

    spec = broker.client.get("/openapi.json").json
    schema = dict(spec["components"]["schemas"]["TokenResponse"])
    body = broker.client.post("/v1/token", data=exchange_form(broker.issuer.token())).json
    jsonschema.validate(body, schema)
    err = broker.client.post("/v1/token", data={}).json
    jsonschema.validate(err, spec["components"]["schemas"]["Error"])
