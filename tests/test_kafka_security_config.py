"""The security section of the configs and the flags: what they accept, what they refuse and
say, which librdkafka settings they make, and that no secret ever shows."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from common.kafka_io import KafkaUnavailable, check_connection, consumer_config
from common.kafka_security import (
    KafkaSecurity,
    SecretError,
    add_security_arguments,
    security_flags,
    security_from_args,
)
from sinks.alerting.config import load_config as load_alert_config
from stream.config import ConfigError, load_config

SECRET = "s3cret-do-not-print"


def _detect_yaml(path: Path, security: dict[str, object], topics: dict[str, object] | None = None
                 ) -> Path:
    path.write_text(yaml.safe_dump({
        "kafka": {"bootstrap": "broker-1:9093", "security": security},
        "topics": {"output": "out", **(topics or {})},
        "detectors": [{"name": "cpu", "input": "in", "measure": "v", "interval": "1s"}],
    }, sort_keys=False))
    return path


def _flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_security_arguments(parser)
    return parser.parse_args(list(argv))


def test_scram_settings_read_the_password_from_the_environment_when_the_client_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("pem")
    config = load_config(_detect_yaml(tmp_path / "d.yaml", {
        "protocol": "SASL_SSL",
        "sasl": {"username": "detector", "password_env": "KAFKA_PW"},
        "tls": {"ca_file": str(ca)},
    }))
    monkeypatch.setenv("KAFKA_PW", SECRET)

    settings = consumer_config("broker-1:9093", "g", security=config.kafka.security)

    assert settings["security.protocol"] == "sasl_ssl"
    assert settings["sasl.mechanism"] == "SCRAM-SHA-512"
    assert (settings["sasl.username"], settings["sasl.password"]) == ("detector", SECRET)
    assert settings["ssl.ca.location"] == str(ca)
    assert settings["ssl.endpoint.identification.algorithm"] == "https"
    assert SECRET not in repr(config) and SECRET not in str(config.model_dump())


def test_mutual_tls_reads_the_key_passphrase_from_a_file(tmp_path: Path) -> None:
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("pem")
    (tmp_path / "pass").write_text(SECRET + "\n")
    security = KafkaSecurity.model_validate({"protocol": "SSL", "tls": {
        "ca_file": str(tmp_path / "ca.pem"), "cert_file": str(tmp_path / "client.pem"),
        "key_file": str(tmp_path / "client.key"), "key_password_file": str(tmp_path / "pass"),
    }})

    settings = security.client_settings()

    assert settings["security.protocol"] == "ssl"
    assert settings["ssl.certificate.location"] == str(tmp_path / "client.pem")
    assert settings["ssl.key.location"] == str(tmp_path / "client.key")
    assert settings["ssl.key.password"] == SECRET  # the file's newline dropped
    assert "sasl.password" not in settings
    assert security.describe() == f"SSL (client certificate {tmp_path / 'client.pem'})"


@pytest.mark.parametrize(("security", "expected"), [
    ({"protocol": "SASL_SSL"}, "kafka.security: protocol SASL_SSL needs a sasl section"),
    ({"protocol": "SASL_SSL", "sasl": {"username": "u"}},
     "kafka.security.sasl: give the password as exactly one of password_env"),
    ({"protocol": "SASL_SSL", "sasl": {"username": "u", "password": SECRET}},
     "kafka.security.sasl.password: Extra inputs are not permitted"),
    ({"protocol": "SSL", "sasl": {"username": "u", "password_env": "X"}},
     "a sasl section needs protocol SASL_SSL (is SSL)"),
    ({"protocol": "SSL", "tls": {"cert_file": __file__}}, "give cert_file and key_file together"),
    ({"protocol": "SSL", "tls": {"ca_file": "/nonexistent/ca.pem"}},
     "ca_file: /nonexistent/ca.pem is not a readable file"),
    ({"protocol": "TLS"}, "kafka.security.protocol: Input should be 'PLAINTEXT', 'SSL' or"),
])
def test_config_errors_name_the_line_and_field_and_never_the_secret(
    tmp_path: Path, security: dict[str, object], expected: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(_detect_yaml(tmp_path / "d.yaml", security))
    message = str(raised.value)
    assert expected in message
    assert "line " in message and str(tmp_path / "d.yaml") in message
    assert SECRET not in message


def test_min_insync_replicas_above_the_replication_factor_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"min_insync_replicas \(3\) cannot exceed replication"):
        load_config(_detect_yaml(tmp_path / "d.yaml", {},
                                 topics={"replication": 2, "min_insync_replicas": 3}))
    config = load_config(_detect_yaml(tmp_path / "ok.yaml", {},
                                      topics={"replication": 3, "min_insync_replicas": 2}))
    assert (config.topics.replication, config.topics.min_insync_replicas) == (3, 2)


def test_an_unset_variable_or_missing_file_is_named_without_touching_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    security = KafkaSecurity.model_validate(
        {"protocol": "SASL_SSL", "sasl": {"username": "u", "password_env": "NOT_SET_ANYWHERE"}}
    )
    with pytest.raises(SecretError, match="environment variable NOT_SET_ANYWHERE is not set"):
        security.client_settings()
    with pytest.raises(KafkaUnavailable, match=r"at 127\.0\.0\.1:1: sasl password: environment"):
        check_connection("127.0.0.1:1", security)


def test_flags_override_the_file_and_replace_its_password_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FROM_FLAG", SECRET)
    (tmp_path / "password").write_text("from the file")
    base = KafkaSecurity.model_validate({"protocol": "SASL_SSL", "sasl": {
        "username": "from-file", "password_file": str(tmp_path / "password")}})

    merged = security_from_args(_flags("--sasl-username", "from-flag",
                                       "--sasl-password-env", "FROM_FLAG"), base)

    assert merged.sasl is not None
    assert (merged.sasl.username, merged.sasl.password_env, merged.sasl.password_file) == (
        "from-flag", "FROM_FLAG", None)
    assert merged.client_settings()["sasl.password"] == SECRET
    # No flag given: the file's section as it is.
    assert security_from_args(_flags(), base) is base


def test_switching_to_ssl_on_the_command_line_drops_the_files_sasl_section() -> None:
    base = KafkaSecurity.model_validate(
        {"protocol": "SASL_SSL", "sasl": {"username": "u", "password_env": "X"}}
    )
    merged = security_from_args(_flags("--security-protocol", "SSL"), base)
    assert (merged.protocol, merged.sasl) == ("SSL", None)


def test_flag_errors_name_the_flag_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--tls-key-file: .*missing\.pem is not a readable"):
        security_from_args(_flags("--security-protocol", "SSL",
                                  "--tls-cert-file", str(tmp_path / "c.pem"),
                                  "--tls-key-file", str(tmp_path / "missing.pem")))
    with pytest.raises(ValueError, match="protocol SASL_SSL needs a sasl section"):
        security_from_args(_flags("--security-protocol", "SASL_SSL"))


def test_the_alert_config_takes_the_same_security_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALERT_KAFKA_PW", SECRET)
    path = tmp_path / "alerts.yaml"
    path.write_text(yaml.safe_dump({
        "bootstrap_servers": "broker-1:9093",
        "kafka_security": {"protocol": "SASL_SSL", "sasl": {
            "username": "alerter", "mechanism": "SCRAM-SHA-256", "password_env": "ALERT_KAFKA_PW"}},
        "receivers": [{"name": "hook", "url": "json://127.0.0.1:9/x"}],
        "rules": [{"name": "all"}],
    }))
    config = load_alert_config(path)
    assert config.kafka_security.describe() == "SASL_SSL (SCRAM-SHA-256 as alerter)"
    assert config.kafka_security.client_settings()["sasl.password"] == SECRET
    assert SECRET not in repr(config)


def test_security_flags_give_a_child_command_the_same_settings(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("pem")
    security = KafkaSecurity.model_validate({
        "protocol": "SASL_SSL",
        "sasl": {"username": "demo", "mechanism": "SCRAM-SHA-256", "password_env": "PW"},
        "tls": {"ca_file": str(tmp_path / "ca.pem"), "verify_hostname": False},
    })
    flags = security_flags(security)
    assert security_from_args(_flags(*flags)) == security
    assert "--tls-no-verify-hostname" in flags and "PW" in flags
    assert security_flags(KafkaSecurity()) == ["--security-protocol", "PLAINTEXT"]


def test_the_demo_hands_its_security_to_every_service(tmp_path: Path) -> None:
    from app.demo import Topics, alert_config, detect_config
    from sinks.alerting.config import AlertConfig
    from stream.config import DetectConfig

    security = KafkaSecurity.model_validate(
        {"protocol": "SASL_SSL", "sasl": {"username": "demo", "password_env": "PW"}}
    )
    topics = Topics.named("")
    detect = DetectConfig.model_validate(
        detect_config("kafka-1:9094", topics, "g", 2, security)
    )
    alerts = AlertConfig.model_validate(
        alert_config("kafka-1:9094", topics, "a", "json://127.0.0.1:1/x", tmp_path, "http://d",
                     security)
    )
    assert detect.kafka.security == security == alerts.kafka_security
    # A plaintext demo writes the configs it always wrote (examples/docker compares them).
    assert "security" not in detect_config("k:9092", topics, "g", 2)["kafka"]
    assert "kafka_security" not in alert_config("k:9092", topics, "a", "json://h/x", tmp_path, "d")


def test_the_demo_refuses_security_flags_for_its_own_plaintext_broker(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from app.cli import main

    code = main(["demo", "--workdir", str(tmp_path / "run"), "--security-protocol", "SSL"])
    assert code == 2
    assert "the security flags go with --bootstrap" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
