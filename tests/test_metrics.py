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
        try:
            out.write_text(f"{metrics._process_id()} {os.getpid()}")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    seen, actual = out.read_text().split()
    assert seen == actual != str(os.getpid())


def test_multiprocess_samples_use_the_cached_process_id(tmp_path):
    """Under gunicorn (PROMETHEUS_MULTIPROC_DIR set before the first import), every metric
    value is of the class built on the cached id, and samples land in this process's file."""
    import os
    import subprocess
    import sys

    code = (
        "from prometheus_client import values\n"
        "from broker import metrics, roles_effects\n"
        "assert isinstance(roles_effects.REVISION._value, values.ValueClass)\n"
        "metrics._PID[0] = 4242  # what a fork would set: the files follow it\n"
        "metrics.observe('issued', 'hit', 0.01)\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert (tmp_path / "counter_4242.db").exists()
    assert (tmp_path / "histogram_4242.db").exists()
