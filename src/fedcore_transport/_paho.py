"""paho-mqtt's client, without the copies of every payload it makes on the way.

paho (2.x) decodes a PUBLISH by ``struct.unpack`` of the whole packet three times and a
slice for its properties: four copies of every payload, on the thread that reads the socket
(the event loop here), for 1 MiB chunks ~a fifth of the loop's time in
``bench/mqtt_throughput.py``. :class:`Client` parses the same fields (topic, packet id,
MQTT 5 properties) from the packet paho has read, and hands the payload on as a read-only
view of that packet: paho starts a new buffer for the next packet and never writes the old
one again. It checks the same bounds (a packet too short for its fields is malformed), and
acknowledges the message after the callback, as paho does.

Only what fedcore uses takes this path: MQTT 5, QoS 1, automatic acknowledgement. Anything
else (and a paho whose internals differ from what this reads) goes through paho's own code.

Sending, paho writes a packet as ``packet[pos:]`` at every write: a slice of the bytearray
it built, so a copy of the whole packet even when the socket takes it in one write. A large
packet is queued as a memoryview of that bytearray instead, whose slices copy nothing (paho
never changes a packet once queued).
"""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MQTTException, Properties, VariableByteIntegers

__all__ = ["Client"]

# What paho's reader catches as a malformed packet (it then drops the connection), and its
# clock for message timestamps: without them, paho's own decoding is used.
_MALFORMED: type[Exception] | None = getattr(paho, "MalformedPacket", None)
_CLOCK = getattr(paho, "time_func", None)
_QOS1 = 1
_VIEW_FROM = 1 << 14  # bytes of a packet from which it is written from a view


class Client(paho.Client):
    """A paho client whose QoS 1 messages carry their payload as a view (see the module)."""

    def _handle_publish(self) -> MQTTErrorCode:
        try:
            command: int = self._in_packet["command"]
            packet: bytearray = self._in_packet["packet"]
            fast = ((command & 0x06) >> 1 == _QOS1 and self._protocol == paho.MQTTv5
                    and not self._manual_ack and isinstance(packet, bytearray)
                    and _MALFORMED is not None and _CLOCK is not None)
        except (AttributeError, KeyError, TypeError):
            fast = False
        if not fast:
            return super()._handle_publish()  # type: ignore[no-any-return, misc]
        assert _MALFORMED is not None and _CLOCK is not None
        try:
            topic, mid, properties, payload = _decode(packet)
        except (MQTTException, ValueError, IndexError, KeyError) as exc:
            raise _MALFORMED(f"Malformed PUBLISH: {exc}") from None
        message = paho.MQTTMessage(mid=mid, topic=topic)
        message.dup = bool(command & 0x08)
        message.qos = _QOS1
        message.retain = bool(command & 0x01)
        message.properties = properties
        message.payload = payload  # type: ignore[assignment]  # a read-only memoryview
        message.timestamp = _CLOCK()
        self._handle_on_message(message)
        return self._send_puback(mid)  # type: ignore[no-any-return]

    def _packet_queue(self, command: int, packet: Any, mid: int, qos: int,
                      info: paho.MQTTMessageInfo | None = None) -> MQTTErrorCode:
        if isinstance(packet, bytearray) and len(packet) >= _VIEW_FROM:
            packet = memoryview(packet)  # written as packet[pos:]: a view's slices copy nothing
        return super()._packet_queue(command, packet, mid, qos, info)  # type: ignore[no-any-return, misc]


def _decode(packet: bytearray) -> tuple[bytes, int, Properties, Any]:
    """``(topic, packet id, properties, payload view)`` of a QoS 1 MQTT 5 PUBLISH body."""
    view = memoryview(packet).toreadonly()
    size = len(view)
    end = 2 + int.from_bytes(view[:2], "big")
    if size < 2 or end + 2 > size:
        raise ValueError("too short for its topic and packet id")
    topic = bytes(view[2:end])
    mid = int.from_bytes(view[end:end + 2], "big")
    pos = end + 2
    head = bytes(view[pos:pos + 4])  # the properties' length: a variable byte integer
    length, used = VariableByteIntegers.decode(head)  # MalformedPacket when it is not one
    if pos + used + length > size:
        raise ValueError("too short for its properties")
    properties = Properties(PacketTypes.PUBLISH)
    properties.unpack(bytes(view[pos:pos + used + length]))
    return topic, mid, properties, view[pos + used + length:]
