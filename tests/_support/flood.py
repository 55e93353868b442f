"""Junk on a node's MQTT inbox at a fixed rate, from a process of its own (cheap to send).

Speaks just enough MQTT 3.1.1 by hand (CONNECT, then QoS 0 PUBLISH packets built in advance
and written in batches every 10 ms), so that the sender, not the node, is never the
bottleneck. The junk cycles through what anyone on the broker can send without a trusted
key: random bytes, well-formed unsigned frames, frames signed by an unknown key, and frames
carrying a trusted researcher's public key with a forged signature (the costliest: only the
signature check refuses them). Every frame claims a different sender name.

    python -m tests._support.flood PORT TOPIC_PREFIX RATE SECONDS TRUSTED_KEY_HEX

prints ``{"sent": N, "seconds": S}`` as JSON when done. ``python -m tests._support.flood
sink PORT TOPIC SECONDS`` is a bare paho-mqtt subscriber that counts what it receives in
SECONDS after its first message and prints ``{"received": N, "seconds": S}``: the most an
MQTT endpoint written in Python takes on this machine, whatever it does with it.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import tempfile
import time

from fedcore.wire import codec
from fedcore.wire.messages import Envelope, Ping, SearchRequest
from fedcore.wire.signing import TRAILER, Guard

__all__ = ["junk", "main"]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def _publish(topic: str, payload: bytes) -> bytes:
    body = _string(topic) + payload
    return b"\x30" + _varint(len(body)) + body


def _connect(client_id: str) -> bytes:
    body = _string("MQTT") + b"\x04\x02\x00\x3c" + _string(client_id)
    return b"\x10" + _varint(len(body)) + body


def junk(n: int, trusted_key: bytes, home: str) -> list[bytes]:
    """``n`` junk messages of the four kinds, in turn (a few distinct ones, reused)."""
    from fedcore.wire.identity import Identity

    stranger = Guard(Identity(os.path.join(home, "stranger.key")), dict, networked=True,
                     max_size=codec.DEFAULT_MAX_FRAME)
    kinds: list[list[bytes]] = [[], [], [], []]
    for i in range(64):
        env = Envelope(SearchRequest(tags=[f"t{i}"]) if i % 2 else Ping(),
                       sender="researcher", recipient="site")
        frame = codec.encode(env)
        kinds[0].append(os.urandom(64 + i))
        kinds[1].append(frame)
        kinds[2].append(stranger.seal(env))
        forged = bytearray(stranger.seal(env))
        forged[-TRAILER + 4:-TRAILER + 36] = trusted_key  # a trusted key, a forged signature
        kinds[3].append(bytes(forged))
    return [kinds[i % 4][(i // 4) % 64] for i in range(n)]


def main(argv: list[str]) -> None:
    port, prefix, rate, seconds, key_hex = (int(argv[0]), argv[1], float(argv[2]),
                                            float(argv[3]), argv[4])
    total = int(rate * seconds)
    messages = junk(min(total, 4096), bytes.fromhex(key_hex), tempfile.mkdtemp())
    packets = [_publish(f"{prefix}/from/intruder-{i}", messages[i % len(messages)])
               for i in range(total)]
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(_connect(f"flood-{os.getpid()}"))
    if sock.recv(4)[:1] != b"\x20":
        raise SystemExit("the broker refused the connection")
    tick = 0.01
    per_tick = max(1, int(rate * tick))
    started = time.monotonic()
    sent = 0
    while sent < total:
        batch = packets[sent:sent + per_tick]
        sock.sendall(b"".join(batch))
        sent += len(batch)
        delay = started + sent / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    elapsed = time.monotonic() - started
    sock.close()
    print(json.dumps({"sent": sent, "seconds": round(elapsed, 3)}))


def sink(argv: list[str]) -> None:
    import threading

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    port, topic, seconds = int(argv[0]), argv[1], float(argv[2])
    count, first = [0], threading.Event()
    started = [0.0]

    def on_message(*_: object) -> None:
        if not count[0]:
            started[0] = time.monotonic()
            first.set()
        count[0] += 1

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sink-{os.getpid()}",
                         protocol=paho.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *_: print("subscribed", flush=True)
    client.connect("127.0.0.1", port)
    client.subscribe(topic, 1)
    client.loop_start()
    first.wait(60)
    time.sleep(seconds)
    received = count[0]
    client.loop_stop()
    print(json.dumps({"received": received,
                      "seconds": round(time.monotonic() - started[0], 3)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "sink":
        sink(sys.argv[2:])
    else:
        main(sys.argv[1:])
