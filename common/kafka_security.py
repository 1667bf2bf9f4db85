"""How anomstream authenticates to Kafka and protects the connection: the typed ``security``
block of the YAML configurations and the ``--security-protocol``/``--sasl-*``/``--tls-*`` flags.

Three set-ups are supported: ``PLAINTEXT`` (a local or otherwise protected network), ``SSL``
(TLS; with ``tls.cert_file``/``tls.key_file`` the client proves itself with a certificate, i.e.
mutual TLS) and ``SASL_SSL`` (a user name and password, SCRAM-SHA-512 by default, over TLS).
SASL without TLS is deliberately not offered: it would send the password's exchange in clear.

Secrets (the SASL password, the client key's passphrase) are never written into the file: the
configuration names an environment variable (``password_env``) or a file (``password_file``)
that holds them. The models keep only those names, so a ``repr``, a validation error or a log
line can never show a secret; ``client_settings()`` reads them when a client is built, and its
result (the librdkafka settings, which do hold secrets) must not be logged.

>>> security = KafkaSecurity.model_validate({
...     "protocol": "SASL_SSL",
...     "sasl": {"username": "detector", "password_env": "KAFKA_PASSWORD"},
... })
>>> security.describe()
'SASL_SSL (SCRAM-SHA-512 as detector)'
>>> "KAFKA_PASSWORD" in repr(security), "sasl.password" in repr(security)
(True, False)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

Protocol = Literal["PLAINTEXT", "SSL", "SASL_SSL"]
Mechanism = Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"]


class SecretError(ValueError):
    """A secret's environment variable is unset or its file unreadable; names which, not what."""


def read_secret(env: str | None, file: Path | None, what: str) -> str:
    """The secret from the environment variable ``env`` or the file ``file`` (one is set).

    A file's trailing newline is dropped (``echo pw > file`` must work). Errors name the
    variable or the file and the setting (``what``), never the value.
    """
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise SecretError(f"{what}: environment variable {env} is not set or empty")
        return value
    if file is None:
        raise SecretError(f"{what}: neither an environment variable nor a file is given")
    try:
        value = file.expanduser().read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as error:
        raise SecretError(f"{what}: cannot read {file}: {error.strerror or error}") from None
    if not value:
        raise SecretError(f"{what}: {file} is empty")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _existing_file(path: Path) -> Path:
    if not path.expanduser().is_file():
        raise ValueError(f"{path} is not a readable file")
    return path


# Checked when the configuration is read: a typo in a path fails before any client is built.
ExistingFile = Annotated[Path, AfterValidator(_existing_file)]


class SaslSettings(_Strict):
    mechanism: Mechanism = "SCRAM-SHA-512"
    username: str = Field(min_length=1)
    password_env: str | None = Field(default=None, min_length=1)
    password_file: ExistingFile | None = None

    @model_validator(mode="after")
    def _one_password_source(self) -> SaslSettings:
        if (self.password_env is None) == (self.password_file is None):
            raise ValueError(
                "give the password as exactly one of password_env (the name of an environment "
                "variable holding it) or password_file (a file holding it)"
            )
        return self

    def password(self) -> str:
        return read_secret(self.password_env, self.password_file, "sasl password")


class TlsSettings(_Strict):
    # None: the system's trusted CAs (a public CA signed the brokers' certificates).
    ca_file: ExistingFile | None = None
    # A client certificate and its key (PEM) make the connection mutual TLS.
    cert_file: ExistingFile | None = None
    key_file: ExistingFile | None = None
    key_password_env: str | None = Field(default=None, min_length=1)
    key_password_file: ExistingFile | None = None
    # Off only for brokers whose certificates do not name the address the client dials.
    verify_hostname: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give cert_file and key_file together (the client's certificate "
                             "and its private key, PEM) or neither")
        if self.key_password_env is not None and self.key_password_file is not None:
            raise ValueError("give the key's passphrase as key_password_env or "
                             "key_password_file, not both")
        if self.key_file is None and (self.key_password_env or self.key_password_file):
            raise ValueError("a key passphrase needs key_file")
        return self


class KafkaSecurity(_Strict):
    protocol: Protocol = "PLAINTEXT"
    sasl: SaslSettings | None = None
    tls: TlsSettings | None = None

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSecurity:
        if self.protocol == "SASL_SSL" and self.sasl is None:
            raise ValueError("protocol SASL_SSL needs a sasl section (username and "
                             "password_env or password_file)")
        if self.protocol != "SASL_SSL" and self.sasl is not None:
            raise ValueError(f"a sasl section needs protocol SASL_SSL (is {self.protocol})")
        if self.protocol == "PLAINTEXT" and self.tls is not None:
            raise ValueError("a tls section needs protocol SSL or SASL_SSL (is PLAINTEXT)")
        return self

    def describe(self) -> str:
        """For messages: the protocol and who we are, never a secret."""
        if self.sasl is not None:
            return f"{self.protocol} ({self.sasl.mechanism} as {self.sasl.username})"
        if self.tls is not None and self.tls.cert_file is not None:
            return f"{self.protocol} (client certificate {self.tls.cert_file})"
        return self.protocol

    def client_settings(self) -> dict[str, Any]:
        """librdkafka settings for this set-up, secrets read now. Holds secrets: never log it."""
        settings: dict[str, Any] = {"security.protocol": self.protocol.lower()}
        if self.sasl is not None:
            settings["sasl.mechanism"] = self.sasl.mechanism
            settings["sasl.username"] = self.sasl.username
            settings["sasl.password"] = self.sasl.password()
        tls = self.tls
        if tls is not None:
            if tls.ca_file is not None:
                settings["ssl.ca.location"] = str(tls.ca_file.expanduser())
            if tls.cert_file is not None and tls.key_file is not None:
                settings["ssl.certificate.location"] = str(tls.cert_file.expanduser())
                settings["ssl.key.location"] = str(tls.key_file.expanduser())
            if tls.key_password_env is not None or tls.key_password_file is not None:
                settings["ssl.key.password"] = read_secret(
                    tls.key_password_env, tls.key_password_file, "tls key passphrase"
                )
            settings["ssl.endpoint.identification.algorithm"] = (
                "https" if tls.verify_hostname else "none"
            )
        return settings


PLAINTEXT = KafkaSecurity()

# Command-line flag -> (section, field) of KafkaSecurity. No flag takes a secret itself: a value
# on the command line is visible to every user of the machine (ps, /proc/*/cmdline).
_FLAGS: dict[str, tuple[str | None, str]] = {
    "security_protocol": (None, "protocol"),
    "sasl_mechanism": ("sasl", "mechanism"),
    "sasl_username": ("sasl", "username"),
    "sasl_password_env": ("sasl", "password_env"),
    "sasl_password_file": ("sasl", "password_file"),
    "tls_ca_file": ("tls", "ca_file"),
    "tls_cert_file": ("tls", "cert_file"),
    "tls_key_file": ("tls", "key_file"),
    "tls_key_password_env": ("tls", "key_password_env"),
    "tls_key_password_file": ("tls", "key_password_file"),
    "tls_verify_hostname": ("tls", "verify_hostname"),
}


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every Kafka-facing command takes; they override the config file's values."""
    group = parser.add_argument_group(
        "Kafka security", "override or replace the configuration's security section; "
        "secrets come from environment variables or files, never from the command line",
    )
    group.add_argument("--security-protocol", choices=("PLAINTEXT", "SSL", "SASL_SSL"),
                       help="PLAINTEXT, SSL (TLS; mutual TLS with --tls-cert-file) or SASL_SSL")
    group.add_argument("--sasl-mechanism", choices=("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"),
                       help="SASL mechanism (default SCRAM-SHA-512)")
    group.add_argument("--sasl-username", metavar="NAME", help="SASL user name")
    group.add_argument("--sasl-password-env", metavar="VAR",
                       help="environment variable holding the SASL password")
    group.add_argument("--sasl-password-file", type=Path, metavar="PATH",
                       help="file holding the SASL password")
    group.add_argument("--tls-ca-file", type=Path, metavar="PEM",
                       help="CA certificate(s) to trust (default: the system's)")
    group.add_argument("--tls-cert-file", type=Path, metavar="PEM",
                       help="client certificate for mutual TLS")
    group.add_argument("--tls-key-file", type=Path, metavar="PEM", help="its private key")
    group.add_argument("--tls-key-password-env", metavar="VAR",
                       help="environment variable holding the key's passphrase")
    group.add_argument("--tls-key-password-file", type=Path, metavar="PATH",
                       help="file holding the key's passphrase")
    group.add_argument("--tls-no-verify-hostname", dest="tls_verify_hostname",
                       action="store_false", default=None,
                       help="accept broker certificates that do not name the address dialled")


def security_from_args(
    args: argparse.Namespace, base: KafkaSecurity = PLAINTEXT
) -> KafkaSecurity:
    """``base`` (the config file's section) with the flags given on the command line applied.

    Raises ``ValueError`` naming the flags to fix.
    """
    data: dict[str, Any] = base.model_dump(exclude_none=True)
    given = False
    for attribute, (section, field) in _FLAGS.items():
        value = getattr(args, attribute, None)
        if value is None:
            continue
        given = True
        target = data if section is None else data.setdefault(section, {})
        target[field] = value
        if field.endswith("_env"):  # a flag's source replaces the file's other source
            target.pop(field.removesuffix("_env") + "_file", None)
        elif field.endswith("_file") and field != "ca_file":
            target.pop(field.removesuffix("_file") + "_env", None)
    if not given:
        return base
    if data.get("protocol") != "SASL_SSL":
        # Switching to SSL on the command line drops the file's SASL section rather than fail.
        data.pop("sasl", None)
    try:
        return KafkaSecurity.model_validate(data)
    except ValidationError as error:
        raise ValueError(_describe_flag_errors(error)) from None


def security_flags(security: KafkaSecurity) -> list[str]:
    """The flags that give ``security`` to a child command (the demo's sink and generators);
    ``security_from_args`` turns them back into ``security``.

    Secrets stay references (variable names, file paths), as in the configuration.
    """
    flags: list[str] = []
    for attribute, (section, field) in _FLAGS.items():
        part = security if section is None else getattr(security, section)
        value = None if part is None else getattr(part, field)
        if attribute == "tls_verify_hostname":
            flags += ["--tls-no-verify-hostname"] if value is False else []
        elif value is not None:
            flags += ["--" + attribute.replace("_", "-"), str(value)]
    return flags


def _describe_flag_errors(error: ValidationError) -> str:
    """One part per problem, naming the flag to fix (or the section, for a missing part)."""
    flags = {place: name for name, place in _FLAGS.items()}
    parts = []
    for item in error.errors(include_url=False, include_input=False):
        location = tuple(str(part) for part in item["loc"])
        place = (location[0], location[1]) if len(location) == 2 else (None, "".join(location))
        flag = flags.get(place)
        where = f"--{flag.replace('_', '-')}" if flag else ".".join(("security", *location))
        parts.append(f"{where}: {str(item['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts)
