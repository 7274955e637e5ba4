"""The official wiotp-sdk (unmodified) over TLS on 8883 and over secure WebSocket on 443.

The SDK dials "<org>.messaging.<domain>" on 8883 (TLS) or 443 (secure WebSocket) and verifies
the server certificate with its caFile option. This script routes that name to the proxy's TLS
test port by wrapping socket.create_connection and passes the test CA as caFile; the certificate
names org1.messaging.warden.test, so hostname verification is real.

An application on 443 (wss) watches device events and status; a device on 8883 (TLS) publishes
and gets a command; a second device on 443 shows up with Protocol mqtt4-ws.

Usage: python3 wiotp_sdk_tls_flow.py TLS_PORT CA_FILE
"""
import queue
import socket
import sys

TLS_PORT, CA_FILE = int(sys.argv[1]), sys.argv[2]
DOMAIN = "warden.test"
WAIT = 10

_create_connection = socket.create_connection


def _routed(address, *args, **kwargs):
    host, port = address[0], address[1]
    if host.endswith(".messaging." + DOMAIN) and port in (8883, 443):
        address = ("127.0.0.1", TLS_PORT)
    return _create_connection(address, *args, **kwargs)


socket.create_connection = _routed

import wiotp.sdk.application  # noqa: E402
import wiotp.sdk.device  # noqa: E402


def options(port, transport):
    return {"domain": DOMAIN, "mqtt": {"port": port, "transport": transport, "caFile": CA_FILE}}


app = wiotp.sdk.application.ApplicationClient(
    config={
        "identity": {"appId": "sdk-wss"},
        "auth": {"key": "a-org1-key0000001", "token": "app-token"},
        "options": options(443, "websockets"),
    }
)
events, statuses, commands = queue.Queue(), queue.Queue(), queue.Queue()
app.deviceEventCallback = events.put
app.deviceStatusCallback = statuses.put
app.connect()
app.subscribeToDeviceEvents(qos=1)
app.subscribeToDeviceStatus(typeId="sensor")


def next_status(device_id, action):
    while True:
        status = statuses.get(timeout=WAIT)
        if status.deviceId == device_id and status.action == action:
            return status


device = wiotp.sdk.device.DeviceClient(
    config={
        "identity": {"orgId": "org1", "typeId": "sensor", "deviceId": "dev1"},
        "auth": {"token": "dev1-token"},
        "options": options(8883, "tcp"),
    }
)
device.commandCallback = commands.put
device.connect()
status = next_status("dev1", "Connect")
assert status.payload["Secure"] is True and status.protocol == "mqtt4", status.payload

assert device.publishEvent(eventId="temperature", msgFormat="json", data={"celsius": 22}, qos=1)
event = events.get(timeout=WAIT)
assert (event.deviceId, event.eventId, event.data) == ("dev1", "temperature", {"celsius": 22}), event.data
assert app.publishCommand("sensor", "dev1", "reboot", "json", {"delay": 0}, qos=1)
command = commands.get(timeout=WAIT)
assert command.commandId == "reboot", command.commandId
device.disconnect()

ws_device = wiotp.sdk.device.DeviceClient(
    config={
        "identity": {"orgId": "org1", "typeId": "sensor", "deviceId": "dev2"},
        "auth": {"token": "dev2-token"},
        "options": options(443, "websockets"),
    }
)
ws_device.connect()
status = next_status("dev2", "Connect")
assert status.payload["Secure"] is True and status.protocol == "mqtt4-ws", status.payload
assert ws_device.publishEvent(eventId="humidity", msgFormat="json", data={"rh": 40}, qos=1)
event = events.get(timeout=WAIT)
while event.deviceId != "dev2":
    event = events.get(timeout=WAIT)
assert (event.eventId, event.data) == ("humidity", {"rh": 40}), event.data
ws_device.disconnect()
app.disconnect()
print("wiotp-sdk tls flow ok")
