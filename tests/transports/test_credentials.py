"""Broker credentials: read from a file or the environment, never shown.

``redact_url`` is the one function every log line, audit record, page, CLI output and file
goes through; the MQTT transport takes its password from ``?password_file=``,
``$FEDCORE_MQTT_PASSWORD_FILE`` or ``$FEDCORE_MQTT_PASSWORD`` against a real Mosquitto that
refuses anonymous clients.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedcore.errors import ConfigurationError, TransportError
from fedcore.transport import open_transport, redact_url

SECRET = "s3cret:p@ss word"  # ':' '@' and a blank: the awkward characters of a password
QUOTED = "s3cret%3Ap%40ss%20word"


@pytest.mark.parametrize(("url", "shown"), [
    (f"mqtts://site-a:{QUOTED}@broker:8883/study?cafile=/ca.pem",
     "mqtts://site-a:***@broker:8883/study?cafile=/ca.pem"),
    ("mqtt://site-a:raw@pass@broker/study", "mqtt://site-a:***@broker/study"),
    ("mqtt://broker/study?username=a&password=hunter22&keepalive=5",
     "mqtt://broker/study?username=a&password=***&keepalive=5"),
    ("wss://host:9000/?token=abc&cafile=x", "wss://host:9000/?token=***&cafile=x"),
    ("mqtt://site-a@broker/study?password_file=/run/secrets/mqtt",
     "mqtt://site-a@broker/study?password_file=/run/secrets/mqtt"),  # a path is no secret
    ("ws://127.0.0.1:8765", "ws://127.0.0.1:8765"),
    ("Cannot reach mqtt://u:hunter22@h:1/f (refused); retrying",
     "Cannot reach mqtt://u:***@h:1/f (refused); retrying"),
])
def test_redact_url_hides_every_credential_and_keeps_the_rest(url, shown):
    assert redact_url(url) == shown
    assert redact_url(shown) == shown  # idempotent


def test_a_bad_url_is_refused_without_showing_its_password():
    with pytest.raises(ConfigurationError) as info:
        open_transport("mqtt://u:hunter22@broker/f?bogus=1", role="node", identity="n")
    assert "hunter22" not in str(info.value) and "u:***@broker" in str(info.value)


# --- against a broker that wants a password ---------------------------------------------------

pytest.importorskip("paho.mqtt")

from tests._support.mqtt import Broker, fed, require_mosquitto  # noqa: E402

USER = "fedcore"


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[Broker]:
    require_mosquitto()
    folder = tmp_path_factory.mktemp("mqtt-credentials")
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.fail("mosquitto_passwd is missing: apt-get install mosquitto", pytrace=False)
    subprocess.run([tool, "-b", "-c", str(folder / "pw"), USER, SECRET], check=True,
                   capture_output=True)
    b = Broker(folder, f"allow_anonymous false\npassword_file {folder / 'pw'}").start()
    yield b
    b.stop()


def _connects(url: str) -> None:
    async def scenario() -> None:
        t = open_transport(url, role="researcher", identity="r")
        await t.start()
        assert SECRET not in t.url and QUOTED not in t.url
        await t.close()

    asyncio.run(scenario())


def _refused(url: str) -> str:
    with pytest.raises(TransportError) as info:
        _connects(url)
    return str(info.value)


def test_the_password_comes_from_a_file_named_in_the_url(broker, tmp_path):
    secret = tmp_path / "mqtt.pw"
    secret.write_text(SECRET + "\n")
    _connects(f"mqtt://{USER}@127.0.0.1:{broker.port}/{fed()}?password_file={secret}")
    message = _refused(f"mqtt://{USER}@127.0.0.1:{broker.port}/{fed()}")
    assert "password_file" in message and "FEDCORE_MQTT_PASSWORD" in message  # how to fix


def test_the_password_and_user_come_from_the_environment(broker, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDCORE_MQTT_USERNAME", USER)
    monkeypatch.setenv("FEDCORE_MQTT_PASSWORD", SECRET)
    _connects(f"mqtt://127.0.0.1:{broker.port}/{fed()}")
    # A URL shown redacted can be given back: the password then comes from the environment.
    _connects(f"mqtt://{USER}:***@127.0.0.1:{broker.port}/{fed()}")
    monkeypatch.delenv("FEDCORE_MQTT_PASSWORD")
    secret = tmp_path / "mqtt.pw"
    secret.write_text(SECRET)
    monkeypatch.setenv("FEDCORE_MQTT_PASSWORD_FILE", str(secret))
    _connects(f"mqtt://127.0.0.1:{broker.port}/{fed()}")


def test_a_password_in_the_url_still_works(broker):
    _connects(f"mqtt://{USER}:{QUOTED}@127.0.0.1:{broker.port}/{fed()}")


def test_a_missing_password_file_says_what_to_fix(tmp_path):
    with pytest.raises(ConfigurationError, match="Cannot read the MQTT password file.*chmod"):
        open_transport(f"mqtt://{USER}@127.0.0.1:1/{fed()}?password_file={tmp_path / 'no'}",
                       role="node", identity="n")


def test_an_unreadable_password_file_is_not_mistaken_for_no_password(tmp_path: Path):
    folder = tmp_path / "secret"
    folder.mkdir()  # a folder is not a password file
    with pytest.raises(ConfigurationError, match="Cannot read the MQTT password file"):
        open_transport(f"mqtt://{USER}@127.0.0.1:1/{fed()}?password_file={folder}",
                       role="node", identity="n")
