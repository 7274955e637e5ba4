#!/usr/bin/env python3
"""Writes the hand-made seed corpus of the fuzz targets: fuzz/seeds/<target>/<name>.

Run from anywhere: python3 fuzz/seeds/make_seeds.py. Files are rewritten, never deleted, so
crash artifacts kept as seeds (named crash-*) stay. Packets follow MQTT 3.1, 3.1.1 and 5;
the edge cases come from /work/shared/spec/malformed-inputs.md (row numbers in the names).

Formats:
  frames     raw bytes as read from a socket (fixed headers with Remaining Length)
  connect    first byte, then the body (no Remaining Length)
  publish    first byte, then the body
  subscribe  first byte, then the body (SUBSCRIBE or UNSUBSCRIBE); or a bare filter string
  rewrite    TEMPLATE \\n CLIENT_ID \\n TOPIC
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            b |= 0x80
        out.append(b)
        if not n:
            return bytes(out)


def s(text):
    data = text if isinstance(text, bytes) else text.encode()
    return struct.pack(">H", len(data)) + data


def u16(n):
    return struct.pack(">H", n)


def u32(n):
    return struct.pack(">I", n)


def props(*items):
    body = b"".join(items)
    return varint(len(body)) + body


# Properties (id + value).
def p_byte(pid, v):
    return bytes([pid, v])


def p_u16(pid, v):
    return bytes([pid]) + u16(v)


def p_u32(pid, v):
    return bytes([pid]) + u32(v)


def p_varint(pid, v):
    return bytes([pid]) + varint(v)


def p_str(pid, v):
    return bytes([pid]) + s(v)


def p_user(k, v):
    return bytes([0x26]) + s(k) + s(v)


def frame(first, body):
    return bytes([first]) + varint(len(body)) + body


def connect_body(version=4, flags=0x02, keep_alive=60, cprops=None, client_id="c1",
                 will=None, username=None, password=None, name=None):
    """will = (props or None, topic, payload)."""
    if name is None:
        name = "MQIsdp" if version == 3 else "MQTT"
    out = s(name) + bytes([version, flags]) + u16(keep_alive)
    if version == 5:
        out += cprops if cprops is not None else props()
    out += s(client_id)
    if will is not None:
        wprops, topic, payload = will
        if version == 5:
            out += wprops if wprops is not None else props()
        out += s(topic) + s(payload)
    if username is not None:
        out += s(username)
    if password is not None:
        out += s(password)
    return out


def publish_body(topic, packet_id=None, pprops=None, payload=b"hello", v5=False):
    out = s(topic)
    if packet_id is not None:
        out += u16(packet_id)
    if v5:
        out += pprops if pprops is not None else props()
    return out + payload


def subscribe_body(packet_id, filters, sprops=None, v5=False):
    out = u16(packet_id)
    if v5:
        out += sprops if sprops is not None else props()
    for f, opts in filters:
        out += s(f) + bytes([opts])
    return out


def unsubscribe_body(packet_id, filters, uprops=None, v5=False):
    out = u16(packet_id)
    if v5:
        out += uprops if uprops is not None else props()
    for f in filters:
        out += s(f)
    return out


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def body_seed(target, name, first, body):
    write(target, name, bytes([first]) + body)


# ---------------------------------------------------------------------------------------------
# CONNECT
# ---------------------------------------------------------------------------------------------
C = {}
C["v311-minimal"] = connect_body(4, 0x02, 60, client_id="d:org1:sensor:d1")
C["v31-mqisdp"] = connect_body(3, 0x02, 30, client_id="a:org1:app")
C["v5-minimal"] = connect_body(5, 0x02, 60, client_id="a:org1:app")
C["v311-user-pass"] = connect_body(4, 0xC2, 60, client_id="d:org1:t:d1",
                                   username="use-token-auth", password="secret-token")
C["v311-will-qos1-retain"] = connect_body(4, 0x04 | (1 << 3) | 0x20 | 0x02, 60, client_id="d:o:t:i",
                                          will=(None, "iot-2/evt/lwt/fmt/json", b'{"gone":1}'))
C["v5-props-all-connect"] = connect_body(
    5, 0xC2, 120,
    cprops=props(p_u32(0x11, 3600), p_u16(0x21, 20), p_u32(0x27, 65536), p_u16(0x22, 10),
                 p_byte(0x19, 1), p_byte(0x17, 0), p_user("k", "v"), p_user("k", "v2"),
                 p_str(0x15, "SCRAM-SHA-1"), bytes([0x16]) + s(b"\x00\x01\x02")),
    client_id="a:org1:app1", username="a-org1-key", password="tok")
C["v5-will-props"] = connect_body(
    5, 0x04 | (2 << 3) | 0x02, 10,
    client_id="g:org1:gw:g1",
    will=(props(p_u32(0x18, 30), p_byte(0x01, 1), p_u32(0x02, 60), p_str(0x03, "application/json"),
                p_str(0x08, "iot-2/type/gw/id/g1/evt/reply/fmt/json"), bytes([0x09]) + s(b"corr"),
                p_user("a", "b")),
          "iot-2/type/gw/id/g1/evt/lwt/fmt/json", b"\x00\xff bye"))
C["v5-password-only"] = connect_body(5, 0x42, 0, client_id="", password=b"\x00\x01")
C["v5-empty-client-id"] = connect_body(5, 0x00, 0, client_id="")
C["v311-utf8-client-id"] = connect_body(4, 0x02, 5, client_id="\ufeffcafé-✓")
C["v5-long-user-prop"] = connect_body(5, 0x02, 60, cprops=props(p_user("x" * 300, "y" * 700)),
                                      client_id="c")
# Edge cases (expected refusals).
C["r12-bad-name"] = connect_body(4, 0x02, 60, name="MQTX")
C["r13-level-6"] = connect_body(6, 0x02, 60, name="MQTT")
C["r14-reserved-flag"] = connect_body(4, 0x03, 60)
C["r15-will-qos3"] = connect_body(4, 0x04 | (3 << 3), 60, will=(None, "t", b"x"))
C["r15-will-retain-no-flag"] = connect_body(4, 0x20, 60)
C["r16-v3-password-no-user"] = connect_body(4, 0x42, 60, password="p")
C["r17-username-missing"] = connect_body(4, 0x82, 60)
C["r11-trailing-bytes"] = connect_body(4, 0x02, 60) + b"\x00"
C["r21-session-expiry-twice"] = connect_body(5, 0x02, 60, cprops=props(p_u32(0x11, 1), p_u32(0x11, 2)))
C["r22-topic-alias-in-connect"] = connect_body(5, 0x02, 60, cprops=props(p_u16(0x23, 1)))
C["r23-receive-max-0"] = connect_body(5, 0x02, 60, cprops=props(p_u16(0x21, 0)))
C["r24-auth-data-no-method"] = connect_body(5, 0x02, 60, cprops=props(bytes([0x16]) + s(b"d")))
C["r26-bad-utf8-client-id"] = connect_body(4, 0x02, 60)[:-4] + u16(2) + b"\xc0\xaf"
C["r27-nul-will-topic"] = connect_body(4, 0x06, 60, will=(None, "a\x00b", b""))
C["r29-wildcard-will-topic"] = connect_body(4, 0x06, 60, will=(None, "a/+/b", b""))
C["r2-nonminimal-prop-len"] = (s("MQTT") + bytes([5, 0x02]) + u16(60) + b"\x80\x00" + s("c"))
for name, body in C.items():
    body_seed("connect", name, 0x10, body)
body_seed("connect", "r7-flags-0x11", 0x11, C["v311-minimal"])
write("connect", "empty-body", b"\x10")

# ---------------------------------------------------------------------------------------------
# PUBLISH
# ---------------------------------------------------------------------------------------------
P = [
    ("v311-qos0", 0x30, publish_body("iot-2/evt/temp/fmt/json", payload=b'{"t":21}')),
    ("v311-qos1", 0x32, publish_body("iot-2/type/t/id/d/evt/e/fmt/f", 1)),
    ("v311-qos2-dup-retain", 0x3D, publish_body("a/b/c", 65535)),
    ("v311-empty-payload", 0x30, publish_body("t", payload=b"")),
    ("v311-deep-200", 0x30, publish_body("/".join(["l"] * 200))),
    ("r35-deep-201", 0x30, publish_body("/".join(["l"] * 201))),
    ("v311-bom-topic", 0x30, publish_body("\ufeffa/\u00e9")),
    ("v5-qos0-noprops", 0x30, publish_body("a/b", v5=True)),
    ("v5-qos1-props", 0x32, publish_body(
        "iot-2/evt/e/fmt/json", 7,
        props(p_byte(0x01, 1), p_u32(0x02, 120), p_str(0x03, "text/plain"),
              p_str(0x08, "reply/to"), bytes([0x09]) + s(b"\x01\x02"), p_user("k", "v"),
              p_user("k", "w"), p_u16(0x23, 3)), v5=True)),
    ("v5-alias-empty-topic", 0x32, publish_body("", 9, props(p_u16(0x23, 1)), v5=True)),
    ("v5-server-sub-ids", 0x30, publish_body("a", None, props(p_varint(0x0B, 1), p_varint(0x0B, 268435455)), v5=True)),
    ("r38-client-sub-id", 0x30, publish_body("a", None, props(p_varint(0x0B, 5)), v5=True)),
    ("r22-session-expiry", 0x30, publish_body("a", None, props(p_u32(0x11, 1)), v5=True)),
    ("r22-unknown-prop-7f", 0x30, publish_body("a", None, props(bytes([0x7F, 0])), v5=True)),
    ("r21-alias-twice", 0x30, publish_body("a", None, props(p_u16(0x23, 1), p_u16(0x23, 2)), v5=True)),
    ("r36-alias-0", 0x30, publish_body("a", None, props(p_u16(0x23, 0)), v5=True)),
    ("r29-response-topic-wildcard", 0x30, publish_body("a", None, props(p_str(0x08, "a/#")), v5=True)),
    ("r23-payload-format-2", 0x30, publish_body("a", None, props(p_byte(0x01, 2)), v5=True)),
    ("r9-qos3", 0x36, publish_body("a", 1)),
    ("r10-dup-qos0", 0x38, publish_body("a")),
    ("r11-empty", 0x30, b""),
    ("r11-qos1-no-id", 0x32, s("a")),
    ("r11-topic-past-end", 0x30, u16(10) + b"abc"),
    ("r11-prop-len-past-end", 0x30, s("a") + b"\x05\x01"),
    ("r26-overlong-utf8", 0x30, u16(2) + b"\xc0\xaf"),
    ("r26-surrogate", 0x30, u16(3) + b"\xed\xa0\x80"),
    ("r27-nul-topic", 0x30, s("allowed\x00/secret")),
    ("r29-plus", 0x30, publish_body("a/+/b")),
    ("r29-hash", 0x30, publish_body("#")),
    ("r31-empty-topic-v3", 0x30, publish_body("")),
    ("r37-packet-id-0", 0x32, publish_body("a", 0)),
    ("r2-nonminimal-prop-len", 0x30, s("a") + b"\x80\x00"),
]
for name, first, body in P:
    body_seed("publish", name, first, body)

# ---------------------------------------------------------------------------------------------
# SUBSCRIBE / UNSUBSCRIBE, and bare filters
# ---------------------------------------------------------------------------------------------
S = [
    ("v311-one", 0x82, subscribe_body(1, [("iot-2/type/+/id/+/evt/+/fmt/+", 1)])),
    ("v311-many", 0x82, subscribe_body(2, [("a/#", 0), ("+", 2), ("a/+/c", 1), ("/", 0)])),
    ("v5-options", 0x82, subscribe_body(3, [("a/b", 0x2D), ("c", 0x1A)], v5=True)),
    ("v5-sub-id-user", 0x82, subscribe_body(4, [("x/#", 1)], props(p_varint(0x0B, 17), p_user("a", "b")), v5=True)),
    ("v5-shared", 0x82, subscribe_body(5, [("$share/group/iot-2/evt/+/fmt/json", 1)], v5=True)),
    ("v5-deep-200", 0x82, subscribe_body(6, [("/".join(["+"] * 199) + "/#", 0)], v5=True)),
    ("r32-no-filters", 0x82, subscribe_body(7, [])),
    ("r33-qos3", 0x82, subscribe_body(8, [("a", 3)])),
    ("r33-reserved-bits", 0x82, subscribe_body(9, [("a", 0xC0)], v5=True)),
    ("r33-retain-handling-3", 0x82, subscribe_body(10, [("a", 0x30)], v5=True)),
    ("r34-no-local-shared", 0x82, subscribe_body(11, [("$share/g/t", 0x04)], v5=True)),
    ("r34-empty-share-name", 0x82, subscribe_body(12, [("$share//t", 0)], v5=True)),
    ("r34-wildcard-share-name", 0x82, subscribe_body(13, [("$share/a+b/t", 0)], v5=True)),
    ("r34-share-no-filter", 0x82, subscribe_body(14, [("$share/g", 0)], v5=True)),
    ("r34-nul-share-name", 0x82, subscribe_body(15, [("$share/\x00/#", 0)], v5=True)),
    ("r30-hash-not-last", 0x82, subscribe_body(16, [("a/#/b", 0)])),
    ("r30-sport-plus", 0x82, subscribe_body(17, [("sport+", 0)])),
    ("r37-packet-id-0", 0x82, subscribe_body(0, [("a", 0)])),
    ("r38-sub-id-0", 0x82, subscribe_body(18, [("a", 0)], props(p_varint(0x0B, 0)), v5=True)),
    ("r8-flags-0x80", 0x80, subscribe_body(19, [("a", 0)])),
    ("unsub-v311", 0xA2, unsubscribe_body(20, ["a/#", "iot-2/type/+/id/+/cmd/+/fmt/+"])),
    ("unsub-v5", 0xA2, unsubscribe_body(21, ["$share/g/a", "b"], props(p_user("k", "v")), v5=True)),
    ("unsub-r32-empty", 0xA2, unsubscribe_body(22, [])),
    ("unsub-r8-flags-0xa0", 0xA0, unsubscribe_body(23, ["a"])),
]
for name, first, body in S:
    body_seed("subscribe", name, first, body)
for name, text in [
    ("filter-r34-nul-share-name", "$share/\x00/#"),
    ("filter-r34-wildcard-share-name", "$share/a+b/t"),
    ("filter-r34-empty-share-name", "$share//t"),
    ("filter-r34-share-no-filter", "$share/g"),
    ("filter-share-empty-filter", "$share/g/"),
    ("filter-share-ok", "$share/g/a/+/#"),
    ("filter-dollar-share-alone", "$share"),
    ("filter-r30-hash-middle", "a/#/b"),
    ("filter-r35-deep-201", "/".join(["+"] * 201)),
    ("filter-slash", "/"),
    ("filter-hash", "#"),
    ("topic-sys", "$SYS/broker/load"),
]:
    write("subscribe", name, text)

# ---------------------------------------------------------------------------------------------
# Frames: streams as a session reads them
# ---------------------------------------------------------------------------------------------
connect311 = frame(0x10, C["v311-minimal"])
F = [
    ("connect-then-ping", connect311 + b"\xc0\x00"),
    ("session-v311", connect311 + frame(0x32, publish_body("a/b", 1)) + frame(0x82, subscribe_body(2, [("a/#", 1)]))
     + b"\x40\x02\x00\x01" + b"\x62\x02\x00\x02" + b"\xc0\x00" + b"\xe0\x00"),
    ("session-v5", frame(0x10, C["v5-props-all-connect"]) + frame(0x30, publish_body("a", None, props(p_u16(0x23, 1)), v5=True))
     + b"\xe0\x01\x04" + b"\xf0\x00"),
    ("rl-127", frame(0x30, publish_body("t", payload=b"x" * 122))),
    ("rl-128", frame(0x30, publish_body("t", payload=b"x" * 123))),
    ("rl-16384-header-only", b"\x30\x80\x80\x01"),
    ("r1-rl-5-bytes", b"\x30\xff\xff\xff\xff\x7f"),
    ("r1-rl-4-bytes-max", b"\x30\xff\xff\xff\x7f"),
    ("r2-nonminimal-ping", b"\xc0\x80\x00"),
    ("r3-huge-declared", b"\x10\xff\xff\xff\x7f" + b"\x00" * 10),
    ("r4-puback-first", b"\x40\x02\x00\x01"),
    ("r5-type-0", b"\x00\x00"),
    ("r5-auth-v3", b"\xf0\x00"),
    ("r6-server-types", b"\x20\x02\x00\x00\x90\x03\x00\x01\x00\xb0\x02\x00\x01\xd0\x00"),
    ("r7-bad-flags", b"\x41\x02\x00\x01\xc1\x00\xe1\x00"),
    ("r8-bad-sub-flags", b"\x80\x00\xa0\x00\x60\x02\x00\x01"),
    ("partial-header", b"\x30"),
    ("partial-length", b"\x30\x80"),
    ("partial-body", b"\x30\x05\x00\x01"),
    ("r48-disconnect-then-more", b"\xe0\x00\x30\x03\x00\x01a"),
]
for name, data in F:
    write("frames", name, data)

# ---------------------------------------------------------------------------------------------
# Rewrite: TEMPLATE \n CLIENT_ID \n TOPIC
# ---------------------------------------------------------------------------------------------
R = [
    ("device-event", "{org}/", "d:org1:sensor:d1", "iot-2/evt/temp/fmt/json"),
    ("device-cmd-filter", "{org}/", "d:org1:sensor:d1", "iot-2/cmd/+/fmt/+"),
    ("device-hash", "{org}/", "d:org1:sensor:d1", "iot-2/#"),
    ("device-other", "{org}/", "d:org1:sensor:d1", "other/topic"),
    ("app-event", "tenants/{org}/", "a:org1:app", "iot-2/type/t/id/i/evt/e/fmt/f"),
    ("app-hash", "{org}/", "a:org1:app", "#"),
    ("scalable-app", "{org}/", "A:org1:app:inst", "iot-2/app/+/mon"),
    ("gateway", "x/{org}/y/", "g:org1:gw:g1", "iot-2/type/t/id/i/evt/e/fmt/f"),
    ("app-share", "{org}/", "a:org1:app", "$share/g/iot-2/type/+/id/+/evt/+/fmt/+"),
    ("device-slash", "{org}/", "d:org1:sensor:d1", "iot-2/"),
    ("templates-org-twice", "{org}/{org}/", "a:o:a", "t"),
    ("deep-template", "/" * 190 + "{org}/", "a:org1:app", "a/b/c/d/e/f/g/h/i/j/k"),
    ("deep-topic", "{org}/", "a:org1:app", "/".join(["l"] * 200)),
    ("long-template", "p" * 65_530 + "{org}/", "a:org1:app", "t"),
]
for name, template, cid, topic in R:
    write("rewrite", name, f"{template}\n{cid}\n{topic}")
