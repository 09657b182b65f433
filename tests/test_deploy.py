"""Deployment artefacts (DESIGN.md §8): docker-compose.yml, docker/, helm/token-broker, deploy/flux.

No Docker engine, cluster or network is needed. The chart is rendered by Helm's own engine (the
``helm-python-sdk`` test dependency bundles it; a ``helm`` binary on PATH is used otherwise) and the
manifests are checked against the Kubernetes OpenAPI schemas (``kubernetes-validate``). The
configs that the compose file and the chart hand to the broker are loaded by the broker's own
settings loader and start-up checks, so a config the broker would refuse fails here first.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
import tomllib
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from broker import policy
from broker.app import check_startup
from broker.policy import parse_role_table
from broker.settings import Settings, settings_from_mapping
from tests.support import CACHE_KEY, REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_DIR = REPO / "deploy" / "compose"
DOCKERFILE = REPO / "docker" / "Dockerfile"
CHART = REPO / "helm" / "token-broker"
FLUX = REPO / "deploy" / "flux"

CONTAINER_CONFIG_ROOT = "/etc/token-broker/"
AUDIT_KEY = base64.b64encode(b"a" * 32).decode()
SECRETS_ENV = {"BROKER_CACHE_KEYS": CACHE_KEY, "BROKER_AUDIT_SIGNING_KEY": AUDIT_KEY}
FLUX_CONTROLLERS = (
    "source-controller",
    "kustomize-controller",
    "image-reflector-controller",
    "notification-controller",
)


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _remap(data: Any, old_root: str, new_root: Path) -> Any:
    """Rewrite absolute container paths (``/etc/token-broker/...``) to a directory on this host."""
    if isinstance(data, dict):
        return {k: _remap(v, old_root, new_root) for k, v in data.items()}
    if isinstance(data, list):
        return [_remap(v, old_root, new_root) for v in data]
    if isinstance(data, str) and data.startswith(old_root):
        return str(new_root / data[len(old_root) :])
    return data


def _container_paths(data: Any) -> Iterator[str]:
    if isinstance(data, dict):
        for v in data.values():
            yield from _container_paths(v)
    elif isinstance(data, list):
        for v in data:
            yield from _container_paths(v)
    elif isinstance(data, str) and data.startswith(CONTAINER_CONFIG_ROOT):
        yield data


# --------------------------------------------------------------------------- docker compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _yaml(COMPOSE_FILE)


def _redis_args(command: list[str]) -> dict[str, str]:
    assert command[0] == "redis-server"
    args = command[1:]
    assert len(args) % 2 == 0, args
    pairs = dict(zip(args[::2], args[1::2], strict=True))
    return {k.removeprefix("--"): v for k, v in pairs.items()}


def test_compose_has_broker_redis_and_emulator(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"broker", "redis", "emulator"}
    broker = services["broker"]
    assert broker["build"]["dockerfile"] == "docker/Dockerfile"
    assert (REPO / broker["build"]["context"] / broker["build"]["dockerfile"]).is_file()
    assert broker["command"] == ["serve", "--config", "/etc/token-broker/broker.yaml"]
    # The emulator is the same image, run as `token-broker emulator`.
    assert services["emulator"]["image"] == broker["image"]
    assert services["emulator"]["build"] == broker["build"]
    assert services["emulator"]["command"][0] == "emulator"
    assert broker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_broker_healthcheck_calls_healthz(compose: dict[str, Any]) -> None:
    check = compose["services"]["broker"]["healthcheck"]
    assert check["test"][0] == "CMD"
    assert any("http://127.0.0.1:8080/healthz" in part for part in check["test"])
    # python:3.11-slim has no curl: the check must run with what the image has.
    assert check["test"][1] == "python"


def test_compose_redis_persists_with_aof_and_never_evicts(compose: dict[str, Any]) -> None:
    redis_service = compose["services"]["redis"]
    args = _redis_args(redis_service["command"])
    assert args["appendonly"] == "yes"
    assert args["appendfsync"] == "everysec"
    assert args["maxmemory-policy"] == "noeviction"
    # The AOF lives in a named volume, so it outlives the container.
    volume, target = redis_service["volumes"][0].split(":")[:2]
    assert target == "/data" and volume in compose["volumes"]
    assert "redis-cli" in redis_service["healthcheck"]["test"]


def test_compose_secrets_are_required_from_the_environment(compose: dict[str, Any]) -> None:
    env = compose["services"]["broker"]["environment"]
    for var in ("BROKER_CACHE_KEYS", "BROKER_AUDIT_SIGNING_KEY"):
        # ${VAR:?message}: compose refuses to start without it; no value is written in the file.
        assert re.fullmatch(rf"\$\{{{var}:\?[^}}]*keygen[^}}]*\}}", env[var]), env[var]
    assert "env_file" not in compose["services"]["broker"]


def test_compose_emulator_shares_the_broker_network_namespace_on_loopback(
    compose: dict[str, Any],
) -> None:
    emulator = compose["services"]["emulator"]
    assert emulator["network_mode"] == "service:broker"
    assert "ports" not in emulator  # it authenticates nobody: never published
    bind = emulator["command"][emulator["command"].index("--bind") + 1]
    settings = settings_from_mapping(_yaml(COMPOSE_DIR / "broker.yaml"), env={})
    assert settings.gcp.iam_endpoint == f"http://{bind}"
    assert settings.gcp.credentials == "anonymous"


def test_an_emulator_on_its_own_host_name_would_be_refused() -> None:
    # Why compose shares the namespace: the settings refuse a non-loopback emulator endpoint.
    data = _yaml(COMPOSE_DIR / "broker.yaml")
    data["gcp"]["iam_endpoint"] = "http://emulator:8085"
    with pytest.raises(Exception, match="loopback"):
        settings_from_mapping(data, env={})


def test_compose_broker_yaml_matches_the_compose_services(compose: dict[str, Any]) -> None:
    settings = settings_from_mapping(_yaml(COMPOSE_DIR / "broker.yaml"), env={})
    services = compose["services"]
    assert settings.redis.url == "redis://redis:6379/0"
    assert "redis" in services
    port = settings.server.bind.rpartition(":")[2]
    assert settings.server.bind.startswith("0.0.0.0:")
    assert f"127.0.0.1:{port}:{port}" in services["broker"]["ports"]
    assert f"{port}/healthz" in " ".join(services["broker"]["healthcheck"]["test"])
    source, target, mode = services["broker"]["volumes"][0].split(":")
    assert (REPO / source).resolve() == COMPOSE_DIR and target == "/etc/token-broker"
    assert mode == "ro"


def test_compose_config_passes_the_broker_start_up_checks() -> None:
    raw = _yaml(COMPOSE_DIR / "broker.yaml")
    for path in _container_paths(raw):
        assert (COMPOSE_DIR / path[len(CONTAINER_CONFIG_ROOT) :]).is_file(), path
    settings = settings_from_mapping(
        _remap(raw, CONTAINER_CONFIG_ROOT, COMPOSE_DIR), source="deploy/compose", env={}
    )
    check_startup(settings, SECRETS_ENV)  # roles load, keys parse, jwks usable


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_accepts_the_file() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    base = [*cli, "-f", str(COMPOSE_FILE), "--project-directory", str(REPO), "config", "-q"]
    ok = subprocess.run(base, env={"PATH": "/usr/bin:/bin", **SECRETS_ENV},
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run(base, env={"PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0
    assert "keygen" in missing.stderr


# --------------------------------------------------------------------------- Dockerfile


def _final_stage(lines: list[str]) -> list[str]:
    starts = [i for i, line in enumerate(lines) if line.upper().startswith("FROM ")]
    return lines[starts[-1] :]


def test_dockerfile_runs_token_broker_as_a_non_root_user() -> None:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines() if ln.strip()]
    args = dict(
        ln.split(None, 1)[1].split("=", 1) for ln in lines if ln.upper().startswith("ARG ")
    )
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert {ln.split()[1] for ln in lines if ln.startswith("FROM ")} == {"${PYTHON_IMAGE}"}
    final = _final_stage(lines)
    users = [ln.split()[1] for ln in final if ln.startswith("USER ")]
    assert users, "the runtime stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so runAsNonRoot can verify it
    assert any("pip install" in ln and "token-broker" in ln for ln in final)
    assert 'ENTRYPOINT ["token-broker"]' in final
    cmd = json.loads(next(ln for ln in final if ln.startswith("CMD "))[4:])
    assert cmd == ["serve", "--config", "/etc/token-broker/broker.yaml"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["token-broker"] == "broker.cli:main"


def test_dockerfile_copies_only_what_its_ignore_file_admits() -> None:
    ignore = (REPO / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    admitted = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    copies = [ln.split()[1:-1] for ln in DOCKERFILE.read_text().splitlines()
              if ln.startswith("COPY ") and "--from" not in ln]
    sources = {src.rstrip("*") for srcs in copies for src in srcs}
    assert sources <= admitted, sources - admitted
    assert (REPO / "pyproject.toml").is_file() and (REPO / "broker").is_dir()


# --------------------------------------------------------------------------- Helm: values


def _deep_merge(base: Any, override: Any) -> Any:
    """Helm's coalescing of values files: maps merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _deep_merge(base.get(key), value) if key in base else value
        return merged
    return copy.deepcopy(override)


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


@pytest.fixture(scope="module")
def ci_values() -> dict[str, Any]:
    return _yaml(CHART / "ci" / "values.yaml")


def _validate(schema: dict[str, Any], values: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return sorted(
        "/".join(str(p) for p in e.absolute_path) + ": " + e.message
        for e in validator.iter_errors(values)
    )


def test_values_schema_is_a_valid_draft7_schema(schema: dict[str, Any]) -> None:
    jsonschema.Draft7Validator.check_schema(schema)


def test_default_values_need_the_required_settings(schema: dict[str, Any]) -> None:
    errors = " ".join(_validate(schema, _yaml(CHART / "values.yaml")))
    for required in ("secrets/cacheKeys/name", "secrets/auditSigningKey/name", "config/issuers",
                     "config/gcp/allowed_service_accounts", "redis"):
        assert required in errors, errors


def test_ci_values_satisfy_the_schema(schema: dict[str, Any], ci_values: dict[str, Any]) -> None:
    assert _validate(schema, _deep_merge(_yaml(CHART / "values.yaml"), ci_values)) == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("secrets", "cacheKeys", "value"), "c2VjcmV0"),  # no place for key material
        (("redis", "url"), "redis://:hunter2@redis:6379/0"),  # passwords go in urlSecret
        (("replicaCount",), 0),
        (("config", "server", "bind"), "0.0.0.0:9999"),  # chart-owned
        (("config", "roles"), {"source": "file", "file": "x"}),  # chart-owned
        (("config", "cache", "keys_env"), "OTHER"),  # chart-owned
        (("config", "server", "workerz"), 2),  # a typo
        (("config", "gcp", "iam_endpoint"), "http://127.0.0.1:8085"),  # no emulator in a cluster
        (("image", "digest"), "latest"),
        (("unknown",), True),
    ],
)
def test_schema_refuses(
    schema: dict[str, Any], ci_values: dict[str, Any], path: tuple[str, ...], value: Any
) -> None:
    values = _deep_merge(_yaml(CHART / "values.yaml"), ci_values)
    node = values
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    assert _validate(schema, values), f"{'.'.join(path)}={value!r} was accepted"


# The keys of broker.yaml that the chart sets itself; everything else must be settable in values.
CHART_OWNED = {
    "server": {"bind", "tls"},
    "redis": {"url"},
    "cache": {"keys_env"},
    "audit": {"signing_key_env"},
}
CHART_OWNED_SECTIONS = {"roles"}


def _model_of(annotation: Any) -> type[BaseModel]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if arg is not Ellipsis and arg is not types.NoneType:
            return _model_of(arg)
    raise AssertionError(f"no settings model in {annotation!r}")


def test_schema_covers_every_broker_setting(schema: dict[str, Any]) -> None:
    config = schema["properties"]["config"]["properties"]
    sections = set(Settings.model_fields) - {"base_dir"}
    assert set(config) | CHART_OWNED_SECTIONS == sections, (
        "broker.yaml sections changed: update helm/token-broker/values.schema.json (config)"
    )
    defs = schema["definitions"]
    for section in sections - CHART_OWNED_SECTIONS:
        model = _model_of(Settings.model_fields[section].annotation)
        node = config[section]
        if node.get("type") == "array":
            node = defs[node["items"]["$ref"].rsplit("/", 1)[1]]
        keys = set(node["properties"]) | CHART_OWNED.get(section, set())
        assert keys == set(model.model_fields), (
            f"{section}: settings {sorted(set(model.model_fields) - keys)} missing from the "
            f"chart's schema, or {sorted(keys - set(model.model_fields))} no longer settings"
        )
        assert node["additionalProperties"] is False
    token_review = defs["issuer"]["properties"]["token_review"]["properties"]
    review_model = _model_of(Settings.model_fields["issuers"].annotation)
    assert set(token_review) == set(
        _model_of(review_model.model_fields["token_review"].annotation).model_fields
    )


def test_chart_knows_every_roles_setting() -> None:
    # The chart renders the roles section itself (source: file, the mounted table).
    roles_model = _model_of(Settings.model_fields["roles"].annotation)
    assert set(roles_model.model_fields) == {"source", "file", "mac_key_env"}, (
        "roles settings changed: update helm/token-broker (templates/_helpers.tpl brokerConfig)"
    )


def test_schema_roles_match_the_role_table_format(schema: dict[str, Any]) -> None:
    role = schema["definitions"]["role"]
    assert set(role["properties"]) == policy.ROLE_KEYS
    assert set(role["required"]) == set(policy.ROLE_REQUIRED)
    assert set(role["properties"]["subjects"]["items"]["properties"]) == policy.SUBJECT_KEYS


# --------------------------------------------------------------------------- Helm: rendering


class RenderError(Exception):
    """Helm refused to render (schema, `required`, `fail`, template error)."""


def _render_texts(values: dict[str, Any], name: str, namespace: str) -> list[str]:
    try:
        import helm_python
    except ImportError:
        helm_python = None
    if helm_python is not None:
        try:
            with helm_python.Chart.load(str(CHART)) as chart:
                out = chart.render(values, name=name, namespace=namespace)
                return [text for path, text in out.items() if path.endswith(".yaml")]
        except helm_python.HelmError as exc:
            raise RenderError(str(exc)) from exc
    helm = shutil.which("helm")
    if helm is None:
        pytest.skip("no Helm engine: install the test extra (helm-python-sdk) or a helm binary")
    proc = subprocess.run(
        [helm, "template", name, str(CHART), "--namespace", namespace, "--values", "-"],
        input=yaml.safe_dump(values), capture_output=True, text=True, timeout=120,
    )
    if proc.returncode != 0:
        raise RenderError(proc.stderr)
    return [proc.stdout]


def render(values: dict[str, Any], name: str = "token-broker",
           namespace: str = "token-broker") -> list[dict[str, Any]]:
    """The chart's manifests for ``values`` (merged over values.yaml by Helm)."""
    docs = []
    for text in _render_texts(values, name, namespace):
        docs.extend(d for d in yaml.safe_load_all(text) if isinstance(d, dict) and d.get("kind"))
    return docs


def _one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, [d["metadata"]["name"] for d in found]
    return found[0]


def _with(values: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return _deep_merge(values, changes)


@pytest.fixture(scope="module")
def manifests(ci_values: dict[str, Any]) -> list[dict[str, Any]]:
    return render(ci_values)


def _container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    pod = _one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    return pod["containers"][0]


def test_chart_renders_the_expected_objects(manifests: list[dict[str, Any]]) -> None:
    kinds = sorted(d["kind"] for d in manifests)
    assert kinds == sorted([
        "ConfigMap", "ConfigMap", "ConfigMap", "Deployment", "NetworkPolicy",
        "PodDisruptionBudget", "Service", "ServiceAccount",
    ])
    assert all(d["metadata"]["labels"]["app.kubernetes.io/instance"] == "token-broker"
               for d in manifests)


@pytest.mark.parametrize("kube_version", ["1.25.0", "latest"])
def test_rendered_manifests_pass_the_kubernetes_schemas(
    ci_values: dict[str, Any], kube_version: str
) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="install the test extra")
    version = kv.latest_version() if kube_version == "latest" else kube_version
    values = _with(ci_values, rbac={"tokenReview": True},
                   redis={"url": "", "urlSecret": {"name": "redis-url", "key": "url"}})
    docs = render(values)
    assert {d["kind"] for d in docs} >= {"ClusterRoleBinding", "Deployment", "NetworkPolicy"}
    for doc in docs:
        kv.validate(doc, version, strict=True)
    # The validator is not a rubber stamp: a misspelt field fails it.
    bad = copy.deepcopy(_one(docs, "Deployment"))
    bad["spec"]["template"]["spec"]["securityContext"]["runAsNonroot"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, version, strict=True)


def test_deployment_is_replicated_and_restricted(manifests: list[dict[str, Any]]) -> None:
    deployment = _one(manifests, "Deployment")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = _container(manifests)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True


def test_probes_and_writable_directories(manifests: list[dict[str, Any]]) -> None:
    container = _container(manifests)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"]["port"] in ports
    pod = _one(manifests, "Deployment")["spec"]["template"]["spec"]
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    env = {e["name"]: e for e in container["env"]}
    assert mounts["/tmp"] in empty_dirs
    assert mounts[env["PROMETHEUS_MULTIPROC_DIR"]["value"]] in empty_dirs


def test_secrets_come_from_secret_references_only(
    manifests: list[dict[str, Any]], ci_values: dict[str, Any]
) -> None:
    env = {e["name"]: e for e in _container(manifests)["env"]}
    for var, ref in (("BROKER_CACHE_KEYS", "cacheKeys"),
                     ("BROKER_AUDIT_SIGNING_KEY", "auditSigningKey")):
        assert "value" not in env[var]
        assert env[var]["valueFrom"]["secretKeyRef"] == ci_values["secrets"][ref]
    assert not [d for d in manifests if d["kind"] == "Secret"]


def _files(manifests: list[dict[str, Any]], tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """Lay the ConfigMaps out as the pod sees them; return broker.yaml (remapped) and the root."""
    pod = _one(manifests, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    volumes = {v["name"]: v for v in pod["volumes"]}
    maps = {d["metadata"]["name"]: d for d in manifests if d["kind"] == "ConfigMap"}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" not in volume:
            continue
        target = tmp_path / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True)
        for key, text in maps[volume["configMap"]["name"]]["data"].items():
            (target / key).write_text(text)
    config_arg = container["args"][container["args"].index("--config") + 1]
    raw = yaml.safe_load((tmp_path / config_arg.lstrip("/")).read_text())
    return _remap(raw, "/", tmp_path), tmp_path


def test_rendered_broker_yaml_passes_the_broker_start_up_checks(
    manifests: list[dict[str, Any]], tmp_path: Path
) -> None:
    config, _ = _files(manifests, tmp_path)
    settings = settings_from_mapping(config, source="helm", env={})
    check_startup(settings, SECRETS_ENV)
    container = _container(manifests)
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert settings.server.bind == f"0.0.0.0:{port}"
    assert settings.redis.url == "rediss://redis.example.internal:6378/0"
    assert settings.cache.keys_env == "BROKER_CACHE_KEYS"
    assert settings.audit.signing_key_env == "BROKER_AUDIT_SIGNING_KEY"


def test_redis_url_from_a_secret_reaches_the_broker(
    ci_values: dict[str, Any], tmp_path: Path
) -> None:
    docs = render(_with(ci_values, redis={"url": "", "urlSecret": {"name": "r", "key": "u"}}))
    env = {e["name"]: e for e in _container(docs)["env"]}
    assert env["BROKER_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "r", "key": "u"}
    config, _ = _files(docs, tmp_path)
    assert "url" not in config["redis"]
    settings = settings_from_mapping(config, env={"BROKER_REDIS_URL": "redis://:pw@r:6379/1"})
    assert settings.redis.url == "redis://:pw@r:6379/1"


def test_existing_roles_config_map_replaces_the_rendered_table(
    ci_values: dict[str, Any],
) -> None:
    docs = render(_with(ci_values, roles={"existingConfigMap": "fleet-roles", "key": "t.yaml"}))
    assert not [d for d in docs if d["kind"] == "ConfigMap" and "roles" in d["metadata"]["name"]]
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    roles_volume = next(v for v in pod["volumes"] if v["name"] == "roles")
    assert roles_volume["configMap"]["name"] == "fleet-roles"
    broker_yaml = yaml.safe_load(_one(docs, "ConfigMap", "-config")["data"]["broker.yaml"])
    assert broker_yaml["roles"]["file"].endswith("/t.yaml")


def test_service_and_pdb_select_the_pods(manifests: list[dict[str, Any]]) -> None:
    pod_labels = _one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = _one(manifests, "Service")
    pdb = _one(manifests, "PodDisruptionBudget")
    for selector in (service["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert pdb["spec"]["maxUnavailable"] == 1


def test_token_review_rbac_is_gated(
    manifests: list[dict[str, Any]], ci_values: dict[str, Any]
) -> None:
    assert not [d for d in manifests if d["kind"] == "ClusterRoleBinding"]
    docs = render(_with(ci_values, rbac={"tokenReview": True}), namespace="brokers")
    binding = _one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == "system:auth-delegator"
    account = _one(docs, "ServiceAccount")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": "brokers"}
    ]
    assert _one(docs, "Deployment")["spec"]["template"]["spec"]["automountServiceAccountToken"]


def test_service_monitor_is_gated(
    manifests: list[dict[str, Any]], ci_values: dict[str, Any]
) -> None:
    assert not [d for d in manifests if d["kind"] == "ServiceMonitor"]
    docs = render(_with(ci_values, serviceMonitor={"enabled": True, "labels": {"release": "p"}}))
    monitor = _one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "p"
    assert monitor["spec"]["endpoints"][0] == {
        "port": "http", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"
    }


def test_network_policy_admits_the_broker_port_and_needed_egress(
    manifests: list[dict[str, Any]], ci_values: dict[str, Any]
) -> None:
    policy_doc = _one(manifests, "NetworkPolicy")
    assert policy_doc["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy_doc["spec"]["ingress"][0]["ports"] == [{"port": "http", "protocol": "TCP"}]
    egress_ports = {p["port"] for rule in policy_doc["spec"]["egress"] for p in rule["ports"]}
    assert {53, 6379, 443} <= egress_ports
    docs = render(_with(ci_values, networkPolicy={"enabled": False}))
    assert not [d for d in docs if d["kind"] == "NetworkPolicy"]


def test_pods_roll_when_the_config_changes(ci_values: dict[str, Any]) -> None:
    def checksums(values: dict[str, Any]) -> dict[str, str]:
        annotations = _one(render(values), "Deployment")["spec"]["template"]["metadata"]
        return {k: v for k, v in annotations["annotations"].items() if k.startswith("checksum/")}

    before = checksums(ci_values)
    after = checksums(_with(ci_values, config={"rate_limit": {"per_subject_per_minute": 5}}))
    assert before["checksum/config"] != after["checksum/config"]
    assert before["checksum/roles"] == after["checksum/roles"]


def test_image_tag_and_digest(ci_values: dict[str, Any]) -> None:
    chart = _yaml(CHART / "Chart.yaml")
    image = _container(render(ci_values))["image"]
    assert image == f"ghcr.io/example/token-broker:{chart['appVersion']}"
    digest = "sha256:" + "ab" * 32
    pinned = _container(render(_with(ci_values, image={"digest": digest})))["image"]
    assert pinned == f"ghcr.io/example/token-broker@{digest}"


def test_chart_refuses_to_render_without_required_values() -> None:
    with pytest.raises(RenderError, match="issuers"):
        render({})


def test_helm_lint_is_clean(ci_values: dict[str, Any]) -> None:
    helm_python = pytest.importorskip("helm_python", reason="install the test extra")
    result = helm_python.lint(str(CHART), ci_values, strict=True)
    assert result["errors"] == []
    # Severity 1 is INFO ("icon is recommended"); anything above is a finding.
    assert [m for m in result["messages"] if m["severity"] > 1] == []


# --------------------------------------------------------------------------- Flux example


@pytest.fixture(scope="module")
def flux_kustomization() -> dict[str, Any]:
    return _yaml(FLUX / "kustomization.yaml")


def _patch_volumes() -> tuple[dict[str, Any], dict[str, str]]:
    patch = _yaml(FLUX / "token-broker-patch.yaml")
    pod = patch["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    return volumes, mounts


def test_flux_credential_configs_name_their_roles_and_the_projected_token() -> None:
    volumes, mounts = _patch_volumes()
    projected = volumes["token-broker-token"]["projected"]["sources"][0]["serviceAccountToken"]
    token_file = f"{mounts['token-broker-token']}/{projected['path']}"
    roles = {r["name"]: r for r in _yaml(FLUX / "roles.yaml")["roles"]}
    files = sorted(p.name for p in (FLUX / "credentials").glob("*.json"))
    assert files == sorted(f"{c}.json" for c in FLUX_CONTROLLERS)
    for controller in FLUX_CONTROLLERS:
        config = json.loads((FLUX / "credentials" / f"{controller}.json").read_text())
        assert config["type"] == "external_account"
        assert config["subject_token_type"] == "urn:ietf:params:oauth:token-type:jwt"
        assert config["token_url"].endswith("/v1/token")
        assert config["credential_source"] == {"file": token_file, "format": {"type": "text"}}
        role = roles[config["audience"]]
        assert role["subjects"] == [{"issuer": "prod-eu", "namespace": "flux-system",
                                     "service_account": controller}]


def test_flux_token_url_is_the_charts_service(ci_values: dict[str, Any]) -> None:
    # The example's token_url is the Service of a release `token-broker` in namespace
    # `token-broker`, the names deploy/flux/README.md tells people to adjust.
    service = _one(render(ci_values, name="token-broker", namespace="token-broker"), "Service")
    port = service["spec"]["ports"][0]["port"]
    host = f"{service['metadata']['name']}.token-broker.svc.cluster.local"
    expected = f"http://{host}{'' if port == 80 else f':{port}'}/v1/token"
    for controller in FLUX_CONTROLLERS:
        config = json.loads((FLUX / "credentials" / f"{controller}.json").read_text())
        assert config["token_url"] == expected


def test_flux_credential_configs_load_in_google_auth(tmp_path: Path) -> None:
    from google.auth import identity_pool

    token = tmp_path / "token"
    token.write_text("header.payload.signature\n")
    for controller in FLUX_CONTROLLERS:
        info = json.loads((FLUX / "credentials" / f"{controller}.json").read_text())
        info["credential_source"]["file"] = str(token)
        creds = identity_pool.Credentials.from_info(info)
        assert creds.info["token_url"] == info["token_url"]
        assert creds.retrieve_subject_token(None) == "header.payload.signature\n"


def test_flux_roles_load_in_the_broker(ci_values: dict[str, Any]) -> None:
    settings = settings_from_mapping(
        _deep_merge(_yaml(CHART / "values.yaml"), ci_values)["config"], env={}
    )
    table = parse_role_table(
        _yaml(FLUX / "roles.yaml"),
        source="deploy/flux/roles.yaml",
        issuers={i.name: i.kind for i in settings.issuers},
        allowed_service_accounts=settings.gcp.allowed_service_accounts,
    )
    assert len(table.roles) == len(FLUX_CONTROLLERS) and table.warnings == ()
    # The token the patch projects is for the broker's exchange audience, not the API server's.
    volumes, _ = _patch_volumes()
    audience = volumes["token-broker-token"]["projected"]["sources"][0]["serviceAccountToken"][
        "audience"
    ]
    assert audience in settings.issuers[0].audiences


def test_flux_config_map_generator_lists_every_credential_file(
    flux_kustomization: dict[str, Any],
) -> None:
    (generator,) = flux_kustomization["configMapGenerator"]
    volumes, _ = _patch_volumes()
    assert volumes["token-broker-credentials"]["configMap"]["name"] == generator["name"]
    assert sorted(generator["files"]) == sorted(
        f"credentials/{c}.json" for c in FLUX_CONTROLLERS
    )


def _flux_stub_components() -> list[dict[str, Any]]:
    """Just enough of gotk-components.yaml: the controllers' Deployments as Flux ships them."""
    docs = []
    for name in (*FLUX_CONTROLLERS, "helm-controller"):
        docs.append({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": "flux-system", "labels": {"app": name}},
            "spec": {
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {
                        "serviceAccountName": name,
                        "containers": [{
                            "name": "manager", "image": f"ghcr.io/fluxcd/{name}:v1",
                            "env": [{"name": "RUNTIME_NAMESPACE", "valueFrom": {
                                "fieldRef": {"fieldPath": "metadata.namespace"}}}],
                            "volumeMounts": [{"name": "temp", "mountPath": "/tmp"}],
                        }],
                        "volumes": [{"name": "temp", "emptyDir": {}}],
                    },
                },
            },
        })
    return docs


def test_flux_kustomization_builds_and_patches_each_controller(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    shutil.copytree(FLUX, tmp_path / "flux-system")
    work = tmp_path / "flux-system"
    (work / "gotk-components.yaml").write_text(yaml.safe_dump_all(_flux_stub_components()))
    (work / "gotk-sync.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "flux-system"}}
    ))
    proc = subprocess.run([kubectl, "kustomize", str(work)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert config_map["metadata"]["namespace"] == "flux-system"
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for name in FLUX_CONTROLLERS:
        pod = deployments[name]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert "RUNTIME_NAMESPACE" in env  # merged into, not replaced
        path = env["GOOGLE_APPLICATION_CREDENTIALS"]["value"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert path == f"{mounts['token-broker-credentials']}/{name}.json"
        volumes = {v["name"]: v for v in pod["volumes"]}
        # The generated (hash-suffixed) ConfigMap name is wired into the volume.
        assert volumes["token-broker-credentials"]["configMap"]["name"] == (
            config_map["metadata"]["name"]
        )
        assert f"{name}.json" in config_map["data"]
        assert json.loads(config_map["data"][f"{name}.json"])["credential_source"]["file"] == (
            f"{mounts['token-broker-token']}/token"
        )
        assert "temp" in volumes
    untouched = deployments["helm-controller"]["spec"]["template"]["spec"]
    assert [v["name"] for v in untouched["volumes"]] == ["temp"]
