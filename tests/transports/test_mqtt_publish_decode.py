"""The MQTT endpoint's own PUBLISH decoding reads what paho's reads, without the copies."""

from __future__ import annotations

import struct

import pytest

pytest.importorskip("paho.mqtt")

from paho.mqtt.client import MQTTv5  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.exception import MalformedPacket  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from fedcore_transport._paho import Client, _decode  # noqa: E402

PUBLISH_QOS1 = 0x30 | (1 << 1)


def _body(topic: bytes, mid: int, payload: bytes, properties: Properties | None = None) -> bytes:
    packed = properties.pack() if properties is not None else b"\x00"
    return struct.pack("!H", len(topic)) + topic + struct.pack("!H", mid) + packed + payload


def _with_properties() -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("k", "v" * 300)]
    props.ContentType = "application/x-fedcore"
    return props


@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)) * 5000])
@pytest.mark.parametrize("properties", [None, _with_properties()])
def test_topic_packet_id_properties_and_payload_are_paho_s(payload, properties):
    from paho.mqtt._packet import decode_publish  # paho's own reading, the reference

    body = _body(b"fedcore/f/to/node/from/researcher", 4242, payload, properties)
    topic, mid, props, view = _decode(bytearray(body))
    expected = decode_publish(PUBLISH_QOS1, bytearray(body), MQTTv5)
    assert (topic, mid, bytes(view)) == (expected.topic, expected.mid, expected.payload)
    assert str(props) == str(expected.properties)
    assert view.readonly


@pytest.mark.parametrize("cut", [0, 1, 5, 35, 37, 38])
def test_a_truncated_publish_is_malformed_and_drops_the_connection(cut):
    body = _body(b"fedcore/f/to/node/from/researcher", 7, b"", _with_properties())[:cut]
    client = Client(CallbackAPIVersion.VERSION2, protocol=MQTTv5)
    client._in_packet["command"] = PUBLISH_QOS1
    client._in_packet["packet"] = bytearray(body)
    heard = []
    client.on_message = lambda *args: heard.append(args)
    with pytest.raises(MalformedPacket):  # paho's reader turns this into a protocol error
        client._handle_publish()
    assert not heard
