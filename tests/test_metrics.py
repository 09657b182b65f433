from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.support import exchange_form


def counts(client):
    text = client.get("/metrics").get_data(as_text=True)
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "token_broker_token_requests":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out[(s.labels["decision"], s.labels["reason"])] = s.value
    return out


def test_requests_counted_by_decision_and_reason(broker):
    before = counts(broker.client)
    broker.client.post("/v1/token", data=exchange_form(broker.issuer.token()))
    broker.client.post("/v1/token", data=exchange_form(broker.issuer.token()))
    broker.client.post("/v1/token", data=exchange_form("garbage"))
    after = counts(broker.client)

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    assert delta(("issued", "miss")) == 1
    assert delta(("issued", "hit")) == 1
    assert delta(("denied", "token_malformed")) == 1


def test_process_id_is_each_forked_process_own(tmp_path):
    """The cached id prometheus_client's multiprocess files are named by follows every fork
    (a child that kept its parent's id would write into the parent's file)."""
    import os

    from broker import metrics

    assert metrics._process_id() == os.getpid()
    out = tmp_path / "child"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        out.write_text(f"{metrics._process_id()} {os.getpid()}")
        os._exit(0)
    os.waitpid(pid, 0)
    seen, actual = out.read_text().split()
    assert seen == actual != str(os.getpid())
