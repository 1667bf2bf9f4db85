"""docker-compose.yml and the Dockerfile stay valid without a Docker engine to run them.

Every service built from the project image runs a registered ``anomstream`` sub-command whose
arguments the real parser accepts; every file the compose file or the Dockerfile refers to
exists; the mounted configurations load; Kafka is the official image in KRaft mode.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
# Published ports listen on loopback unless ANOMSTREAM_BIND says otherwise.
BIND = "${ANOMSTREAM_BIND:-127.0.0.1}"
GENERATORS = {"generate-market", "generate-ops"}


def compose() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(document, dict)
    return document


def project_services() -> dict[str, dict[str, Any]]:
    return {name: spec for name, spec in compose()["services"].items() if "build" in spec}


def host_mounts(spec: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of the service's bind mounts (``./...:/...``)."""
    mounts = {}
    for volume in spec.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        if source.startswith((".", "/")):
            mounts[target] = ROOT / source
    return mounts


def test_kafka_is_the_official_image_as_one_kraft_node_for_host_and_containers() -> None:
    kafka = compose()["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = {key: str(value) for key, value in kafka["environment"].items()}
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"]), "a 16-byte base64 cluster id"
    advertised = env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert "INTERNAL://kafka:9092" in advertised and "HOST://localhost:29092" in advertised
    listeners = {item.split("://")[0] for item in env["KAFKA_LISTENERS"].split(",")}
    protocols = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert listeners == set(protocols) == {"INTERNAL", "CONTROLLER", "HOST"}
    assert f"{BIND}:29092:29092" in kafka["ports"]


def test_every_service_runs_a_registered_subcommand_with_valid_arguments() -> None:
    services = project_services()
    assert {"generate-market", "generate-ops", "detect", "sink", "alert", "dashboard"} <= set(
        services
    )
    unregistered = []
    parser = build_parser()
    for name, spec in services.items():
        command = spec["command"]
        assert command[0] == "anomstream", f"{name}: runs {command[0]!r}, not anomstream"
        if command[1] not in COMMANDS:
            unregistered.append(f"{name}: {command[1]}")
            continue
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors), contextlib.suppress(SystemExit):
            parser.parse_args(command[1:])
        assert not errors.getvalue(), f"{name}: {' '.join(command)}\n{errors.getvalue()}"
        bootstrap = command[command.index("--bootstrap") + 1] if "--bootstrap" in command else None
        assert bootstrap in (None, "kafka:9092"), f"{name}: containers reach Kafka as kafka:9092"
        if spec.get("depends_on"):
            assert spec["depends_on"]["kafka"]["condition"] == "service_healthy"
    if unregistered:
        pytest.skip(f"sub-commands not registered yet: {', '.join(unregistered)}")


def test_referenced_files_exist_and_mounted_configs_load() -> None:
    from sinks.alerting.config import load_config as load_alerts
    from stream.config import load_config as load_detect

    services = project_services()
    for name, spec in services.items():
        assert (ROOT / spec["build"] / "Dockerfile").is_file(), name
        mounts = host_mounts(spec)
        for source in mounts.values():
            assert source.exists(), f"{name} mounts {source}, which does not exist"
        for argument in spec["command"]:
            if argument.startswith("/config/"):
                assert argument in mounts, f"{name}: {argument} is not mounted"
    detect = load_detect(host_mounts(services["detect"])["/config/detect.yaml"])
    assert detect.kafka.bootstrap == "kafka:9092"
    alerts = load_alerts(host_mounts(services["alert"])["/config/alerts.yaml"], {})
    assert alerts.bootstrap_servers == "kafka:9092"
    assert alerts.receivers[0].url == "json://webhook:8080/alerts"
    assert alerts.result_topic == detect.topics.output
    # The generators write the topics the detectors read, the sink reads what they write.
    generated = {
        spec["command"][spec["command"].index("--topic") + 1]
        for name, spec in services.items()
        if spec["command"][1] == "generate"
    }
    assert generated == set(detect.input_topics)
    sink = services["sink"]["command"]
    assert sink[sink.index("--topic") + 1] == detect.topics.output
    named = set(compose()["volumes"])
    for spec in services.values():
        for volume in spec.get("volumes", []):
            origin = str(volume).split(":")[0]
            assert origin.startswith((".", "/")) or origin in named


def test_docker_configs_match_the_demo() -> None:
    """examples/docker/ holds the demo's detectors and alert rule, pointed at the compose hosts."""
    from app.demo import Topics, alert_config, detect_config

    topics = Topics.named("")
    detect = yaml.safe_load((ROOT / "examples/docker/detect.yaml").read_text())
    assert detect == detect_config("kafka:9092", topics, "anomstream-detect", 4)
    alerts = yaml.safe_load((ROOT / "examples/docker/alerts.yaml").read_text())
    assert alerts == alert_config(
        "kafka:9092",
        topics,
        "anomstream-alerter",
        "json://webhook:8080/alerts",
        Path("/data/alert-state"),
        "http://localhost:8501",
    )


def test_dockerfile_builds_the_project_on_python_311_slim() -> None:
    lines = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[0] == "FROM python:3.11-slim"
    copied = [part for line in lines if line.startswith("COPY ") for part in line.split()[1:-1]]
    missing = [path for path in copied if not (ROOT / path).exists()]
    assert not missing, f"the Dockerfile copies files that do not exist: {missing}"
    # Everything pyproject.toml packages is copied before `pip install .`.
    assert {"pyproject.toml", "stream", "detectors", "sinks", "dashboard"} <= set(copied)
    install = next(i for i, line in enumerate(lines) if "pip install ." in line)
    assert all(i < install for i, line in enumerate(lines) if line.startswith("COPY "))
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not set(copied) & set(ignored)


def test_published_ports_listen_on_loopback_unless_told_otherwise() -> None:
    published = {
        name: spec["ports"] for name, spec in compose()["services"].items() if spec.get("ports")
    }
    assert {"kafka", "dashboard", "prometheus", "grafana"} <= set(published)
    for name, ports in published.items():
        for port in ports:
            host_ip, host_port, container_port = str(port).rsplit(":", 2)
            assert host_ip == BIND, f"{name} publishes {port} on every interface"
            assert host_port == container_port


def test_services_restart_and_report_their_health() -> None:
    services = compose()["services"]
    for name, spec in services.items():
        if name in GENERATORS:
            # A restarted generator would replay its whole feed into the input topics.
            assert spec["restart"] == "no", name
            continue
        assert spec.get("restart") in ("unless-stopped", "always", "on-failure"), name
        if name == "sink":
            continue  # no endpoint to ask; it exits on failure and the restart policy acts
        check = spec.get("healthcheck", {}).get("test")
        assert check and check[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
    # The workers' healthcheck asks /healthz on the port the worker serves (on every interface,
    # for Prometheus); the alerter's asks its /metrics.
    for name, path in (("detect", "/healthz"), ("alert", "/metrics")):
        command = services[name]["command"]
        port = command[command.index("--metrics-port") + 1]
        assert command[command.index("--metrics-host") + 1] == "0.0.0.0"
        assert f"http://127.0.0.1:{port}{path}" in " ".join(services[name]["healthcheck"]["test"])


def metric_names_in(expression: str) -> set[str]:
    """Our metrics and ``up`` (which Prometheus records for every scrape target)."""
    return set(re.findall(r"\b(?:anomstream_[a-z0-9_]+|up)\b", expression))


def exported_metric_names() -> set[str]:
    """The sample names the workers and the alerter export, as PromQL sees them."""
    import importlib

    import prometheus_client

    from stream.metrics import WorkerMetrics

    # Importing the alerter's modules registers its metrics in the default registry.
    for module in ("sinks.alerting.notifier", "sinks.alerting.service"):
        importlib.import_module(module)

    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
    }
    names = {"up"}
    for registry in (WorkerMetrics().registry, prometheus_client.REGISTRY):
        for family in registry.collect():
            names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    return names


def prometheus() -> tuple[dict[str, Any], dict[str, Path]]:
    spec = compose()["services"]["prometheus"]
    mounts = host_mounts(spec)
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    return config, mounts


def test_prometheus_scrapes_the_workers_and_the_alerter_and_loads_the_rules() -> None:
    config, mounts = prometheus()
    services = compose()["services"]
    targets: set[str] = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets |= set(static["targets"])
        for dns in job.get("dns_sd_configs", []):
            targets |= {f"{name}:{dns['port']}" for name in dns["names"]}
    for name in ("detect", "alert"):
        command = services[name]["command"]
        assert f"{name}:{command[command.index('--metrics-port') + 1]}" in targets, name
    exported = exported_metric_names()
    rules = []
    for rule_file in config["rule_files"]:
        document = yaml.safe_load(mounts[rule_file].read_text())
        for group in document["groups"]:
            assert group["name"] and group["rules"]
            rules += group["rules"]
    assert {"AnomstreamWorkerDown", "AnomstreamWorkerStalled"} <= {r["alert"] for r in rules}
    for rule in rules:
        assert rule["alert"] and rule["expr"] and rule["annotations"]["summary"], rule
        unknown = metric_names_in(rule["expr"]) - exported
        assert not unknown, f"{rule['alert']}: the code exports no {sorted(unknown)}"


def test_grafana_provisions_a_dashboard_of_metrics_the_code_exports() -> None:
    spec = compose()["services"]["grafana"]
    mounts = host_mounts(spec)
    provisioning = mounts["/etc/grafana/provisioning"]
    datasources = yaml.safe_load(
        (provisioning / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    assert datasources[0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(
        (provisioning / "dashboards" / "anomstream.yml").read_text()
    )["providers"]
    dashboards_dir = providers[0]["options"]["path"]
    dashboard = json.loads((mounts[dashboards_dir] / "anomstream.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    exported = exported_metric_names()
    used: set[str] = set()
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["type"] and panel["title"] and panel["gridPos"]["w"] > 0, panel
        assert panel["datasource"]["uid"] == datasources[0]["uid"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))
        for target in panel["targets"]:
            names = metric_names_in(target["expr"])
            assert names, target
            assert names <= exported, f"{panel['title']}: the code exports no {names - exported}"
            used |= names
    # What an operator looks at first: throughput, lag, scoring latency, anomalies per detector,
    # alert deliveries.
    assert {
        "anomstream_records_in_total",
        "anomstream_consumer_lag",
        "anomstream_scoring_seconds_bucket",
        "anomstream_anomalies_total",
        "anomstream_alert_notifications_delivered_total",
    } <= used
