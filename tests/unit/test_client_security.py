"""How `kafka.sasl/tls` and `redis.username/password/tls` reach the clients (`streamer produce` and `tail`
included), and that showing them hides secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from redis.connection import parse_url
from typer.testing import CliRunner

from streamer.cli import app
from streamer.config import KafkaSettings, RedisSettings
from streamer.kafka.client_config import base_config, describe_security, security_config
from streamer.observe.logs import redact
from streamer.state.client_url import client_url

SASL = {"mechanism": "SCRAM-SHA-256", "username": "svc", "password": "pw-1"}
TLS = {"ca_file": "/etc/ca.pem", "cert_file": "/etc/me.pem", "key_file": "/etc/me.key", "key_password": "kp-2"}


@pytest.mark.parametrize(("sasl", "tls", "protocol"), [
    (None, None, "plaintext"), (None, TLS, "ssl"), (SASL, None, "sasl_plaintext"), (SASL, TLS, "sasl_ssl")])
def test_security_protocol_follows_from_which_of_sasl_and_tls_are_set(sasl, tls, protocol):
    assert security_config(KafkaSettings(sasl=sasl, tls=tls))["security.protocol"] == protocol


def test_sasl_and_tls_become_librdkafka_properties_and_extra_client_settings_win():
    settings = KafkaSettings(sasl=SASL, tls={**TLS, "verify_hostname": False}, client={"sasl.username": "override"})
    config = base_config(settings, "b:9093")
    assert config == {
        "bootstrap.servers": "b:9093", "security.protocol": "sasl_ssl",
        "sasl.mechanism": "SCRAM-SHA-256", "sasl.username": "override", "sasl.password": "pw-1",
        "ssl.endpoint.identification.algorithm": "none", "ssl.ca.location": "/etc/ca.pem",
        "ssl.certificate.location": "/etc/me.pem", "ssl.key.location": "/etc/me.key", "ssl.key.password": "kp-2",
    }


def test_the_description_names_mechanism_and_user_but_never_the_password():
    text = describe_security(KafkaSettings(sasl=SASL, tls={}))
    assert text == "SASL SCRAM-SHA-256 as svc, TLS" and "pw-1" not in text


def test_a_logged_client_config_shows_no_secret():
    text = redact(str(base_config(KafkaSettings(sasl=SASL, tls=TLS), "b:9093")))
    assert "pw-1" not in text and "kp-2" not in text and "'sasl.username': 'svc'" in text


def test_a_client_certificate_needs_its_key():
    with pytest.raises(ValueError, match="cert_file and key_file go together"):
        KafkaSettings(tls={"cert_file": "/etc/me.pem"})


def test_redis_settings_override_the_credentials_of_the_url():
    url = client_url(RedisSettings(username="app", password="new"), "redis://old:stale@h:6380/2")
    assert parse_url(url) == {"username": "app", "password": "new", "host": "h", "port": 6380, "db": 2}


def test_a_url_without_settings_keeps_its_own_credentials():
    assert client_url(RedisSettings(), "redis://:own@h:6379/0") == "redis://:own@h:6379/0"


@given(user=st.text(min_size=1, max_size=20), password=st.text(min_size=1, max_size=40))
def test_any_user_and_password_reach_redis_intact_and_show_redacted(user, password):
    url = client_url(RedisSettings(username=user, password=password), "redis://127.0.0.1:6379/0")
    parsed = parse_url(url)
    assert (parsed["username"], parsed["password"]) == (user, password)
    assert redact(url).endswith(":***@127.0.0.1:6379/0")


def test_tls_settings_turn_the_url_into_rediss_with_the_files_and_a_redacted_key_password():
    tls = {**TLS, "verify_hostname": False}
    url = client_url(RedisSettings(password="pw", tls=tls), "redis://h:6379/0")
    assert url.startswith("rediss://:pw@h:6379/0?")
    assert {key: value for key, value in parse_url(url).items() if key.startswith("ssl")} == {
        "ssl_cert_reqs": "required", "ssl_check_hostname": False, "ssl_ca_certs": str(Path("/etc/ca.pem")),
        "ssl_certfile": "/etc/me.pem", "ssl_keyfile": "/etc/me.key", "ssl_password": "kp-2"}
    shown = redact(url)
    assert "pw" not in shown.split("@")[0] and "kp-2" not in shown


@pytest.fixture
def tool_clients(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """The librdkafka settings `streamer produce` and `tail` hand their clients (which send nothing)."""
    from streamer.kafka import tools

    seen: list[dict[str, object]] = []
    monkeypatch.setattr(tools, "produce_lines", lambda config, *_a, **_k: seen.append(config) or 0)
    monkeypatch.setattr(tools, "read_topic", lambda config, *_a, **_k: seen.append(config) or [])
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.delenv("STREAMER_CONFIG", raising=False)
    return seen


def test_produce_and_tail_log_in_with_the_sasl_and_tls_of_the_config_file(tool_clients, tmp_path: Path):
    config = tmp_path / "streamer.yaml"
    config.write_text(yaml.safe_dump({"kafka": {"bootstrap_servers": "b:9093", "sasl": SASL, "tls": TLS}}))
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"id": "1", "text": "hi"}\n')
    runner = CliRunner()
    assert runner.invoke(app, ["produce", "t", str(lines), "--config", str(config)]).exit_code == 0
    assert runner.invoke(app, ["tail", "t", "--config", str(config), "--bootstrap", "other:9093"]).exit_code == 0
    expected = base_config(KafkaSettings(sasl=SASL, tls=TLS), "b:9093")
    assert tool_clients == [expected, {**expected, "bootstrap.servers": "other:9093"}]


def test_produce_and_tail_take_the_login_from_the_environment_as_run_does(tool_clients, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no ./streamer.yaml
    for field, value in SASL.items():
        monkeypatch.setenv(f"STREAMER_KAFKA__SASL__{field.upper()}", value)
    assert CliRunner().invoke(app, ["tail", "t"]).exit_code == 0
    assert tool_clients == [base_config(KafkaSettings(sasl=SASL), "localhost:9092")]
    assert tool_clients[0]["security.protocol"] == "sasl_plaintext"


def test_a_broken_config_stops_produce_with_exit_code_2(tool_clients, tmp_path: Path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"kafka": {"sasl": {"mechanism": "PLAIN"}}}))
    result = CliRunner().invoke(app, ["produce", "t", "--config", str(config)], input="")
    assert result.exit_code == 2 and tool_clients == []
