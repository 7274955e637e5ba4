"""The official IBM Watson IoT Platform Python SDK (wiotp-sdk, unmodified) against mqtt-warden.

A device publishes events, an application subscribed with wildcards receives them, the
application sends a command that the device receives, and the device's status shows on `mon`.

The SDK dials "<org>.messaging.<domain>" on port 1883 only; this script routes that name to
the proxy's ephemeral test port by wrapping socket.create_connection, and touches nothing else.

Usage: python3 wiotp_sdk_flow.py PORT
"""
import queue
import socket
import sys
import threading

PORT = int(sys.argv[1])
DOMAIN = "warden.test"
WAIT = 10

_create_connection = socket.create_connection


def _routed(address, *args, **kwargs):
    host, port = address[0], address[1]
    if host.endswith(".messaging." + DOMAIN):
        address = ("127.0.0.1", PORT)
    return _create_connection(address, *args, **kwargs)


socket.create_connection = _routed

import wiotp.sdk.application  # noqa: E402
import wiotp.sdk.device  # noqa: E402

OPTIONS = {"domain": DOMAIN, "mqtt": {"port": 1883, "transport": "tcp"}}


def acked(client):
    """Returns a function that waits until every subscription so far was acknowledged."""
    done = threading.Event()
    pending = set()
    lock = threading.Lock()

    def callback(mid, granted):
        with lock:
            pending.discard(mid)
            if not pending:
                done.set()

    client.subscriptionCallback = callback

    def wait(mids):
        with lock:
            pending.update(m for m in mids if m)
            if not pending:
                return
            done.clear()
        assert done.wait(WAIT), "subscriptions acknowledged"

    return wait


app = wiotp.sdk.application.ApplicationClient(
    config={
        "identity": {"appId": "sdkapp"},
        "auth": {"key": "a-org1-key0000001", "token": "app-token"},
        "options": OPTIONS,
    }
)
events, statuses, commands = queue.Queue(), queue.Queue(), queue.Queue()
app.deviceEventCallback = events.put
app.deviceStatusCallback = statuses.put
wait_app_subs = acked(app)
app.connect()
wait_app_subs([app.subscribeToDeviceEvents(qos=1), app.subscribeToDeviceStatus(typeId="sensor", deviceId="dev1")])

device = wiotp.sdk.device.DeviceClient(
    config={
        "identity": {"orgId": "org1", "typeId": "sensor", "deviceId": "dev1"},
        "auth": {"token": "dev1-token"},
        "options": OPTIONS,
    }
)
device.commandCallback = commands.put
device_subscribed = threading.Event()
device.subscriptionCallback = lambda mid, granted: device_subscribed.set()
device.connect()
assert device_subscribed.wait(WAIT), "device subscribed to its commands"


def next_status(action):
    while True:
        status = statuses.get(timeout=WAIT)
        if status.action == action:
            return status


status = next_status("Connect")
assert status.clientId == "d:org1:sensor:dev1", status.clientId
assert status.typeId == "sensor" and status.deviceId == "dev1"

assert device.publishEvent(eventId="temperature", msgFormat="json", data={"celsius": 21.5}, qos=1)
event = events.get(timeout=WAIT)
assert (event.typeId, event.deviceId, event.eventId, event.format) == ("sensor", "dev1", "temperature", "json")
assert event.data == {"celsius": 21.5}, event.data

assert app.publishCommand("sensor", "dev1", "reboot", "json", {"delay": 0}, qos=1)
command = commands.get(timeout=WAIT)
assert (command.commandId, command.format, command.data) == ("reboot", "json", {"delay": 0})

device.disconnect()
status = next_status("Disconnect")
assert status.closeCode == 0 and status.readMsg == 1 and status.writeMsg == 1, status.payload
app.disconnect()
print("wiotp-sdk flow ok")
