"""docker-compose.yml and the Dockerfile stay valid without a Docker engine to run them.

Every service built from the project image runs a registered ``anomstream`` sub-command whose
arguments the real parser accepts; every file the compose file or the Dockerfile refers to
exists; the mounted configurations load; Kafka is the official image in KRaft mode.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]


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
    assert "29092:29092" in kafka["ports"]


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
    from stream.demo import Topics, alert_config, detect_config

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
