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
    """Returns a function that waits until the given subscriptions were acknowledged (a SUBACK
    may arrive before subscribe() has returned its mid)."""
    done = threading.Condition()
    acknowledged = set()

    def callback(mid, granted):
        with done:
            acknowledged.add(mid)
            done.notify_all()

    client.subscriptionCallback = callback

    def wait(mids):
        with done:
            ok = done.wait_for(lambda: all(m in acknowledged for m in mids if m), WAIT)
        assert ok, "subscriptions acknowledged"

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

# Two instances of one scalable application (A:org1:pool:iN) split the device's events.
import wiotp.sdk.gateway  # noqa: E402

shared_events = queue.Queue()
instances = []
for n in (1, 2):
    instance = wiotp.sdk.application.ApplicationClient(
        config={
            "identity": {"appId": "pool"},
            "auth": {"key": "a-org1-key0000001", "token": "app-token"},
            "options": {**OPTIONS, "mqtt": {**OPTIONS["mqtt"], "instanceId": "i%d" % n}},
        }
    )
    instance.deviceEventCallback = lambda event, n=n: shared_events.put((n, int(event.data["n"])))
    wait_subs = acked(instance)
    instance.connect()
    wait_subs([instance.subscribeToDeviceEvents(eventId="pooled", qos=1)])
    instances.append(instance)
device.connect()
for n in range(40):
    device.publishEvent(eventId="pooled", msgFormat="json", data={"n": n}, qos=1)
received = [shared_events.get(timeout=WAIT) for _ in range(40)]
assert sorted(n for _, n in received) == list(range(40)), "each event reaches exactly one instance"
assert {who for who, _ in received} == {1, 2}, "both instances take a share"
assert shared_events.empty()
for instance in instances:
    instance.disconnect()
device.disconnect()

# A gateway publishes for a device behind it and receives that device's commands.
gateway = wiotp.sdk.gateway.GatewayClient(
    config={
        "identity": {"orgId": "org1", "typeId": "edge-gw", "deviceId": "gw1"},
        "auth": {"token": "gw1-token"},
        "options": OPTIONS,
    }
)
device_commands = queue.Queue()
# wiotp-sdk 1.0.1's GatewayClient parses device commands with the device's short-form Command
# class, so its deviceCommandCallback never fires for iot-2/type/T/id/I/cmd/...; read the
# delivery from the SDK's own paho client instead.
gateway.client.message_callback_add(
    "iot-2/type/+/id/+/cmd/+/fmt/+", lambda client, userdata, message: device_commands.put(message)
)
wait_gw = acked(gateway)
gateway.connect()
wait_gw([gateway.subscribeToDeviceCommands("sensor", "behind-gw")])
assert gateway.publishDeviceEvent("sensor", "behind-gw", "temperature", "json", {"celsius": 19}, qos=1)
event = events.get(timeout=WAIT)
while event.eventId == "pooled":  # the first application also saw the pooled events
    event = events.get(timeout=WAIT)
assert (event.typeId, event.deviceId, event.eventId) == ("sensor", "behind-gw", "temperature")
assert app.publishCommand("sensor", "behind-gw", "set", "json", {"on": True}, qos=1)
command = device_commands.get(timeout=WAIT)
assert command.topic == "iot-2/type/sensor/id/behind-gw/cmd/set/fmt/json", command.topic
gateway.disconnect()
app.disconnect()

# A quickstart device needs no credentials; a paho client watches its events.
import paho.mqtt.client as paho  # noqa: E402

quickstart_events = queue.Queue()
viewer = paho.Client("a:quickstart:sdk-viewer")
viewer.on_message = lambda client, userdata, message: quickstart_events.put(message)
subscribed = threading.Event()
viewer.on_subscribe = lambda *args: subscribed.set()
viewer.connect("127.0.0.1", PORT)
viewer.loop_start()
viewer.subscribe("iot-2/type/thermo/id/sdk-qs/evt/+/fmt/+", qos=0)
assert subscribed.wait(WAIT)
qs_device = wiotp.sdk.device.DeviceClient(
    # wiotp-sdk insists on a token even for quickstart; the proxy ignores credentials there.
    config={
        "identity": {"orgId": "quickstart", "typeId": "thermo", "deviceId": "sdk-qs"},
        "auth": {"token": "ignored"},
        "options": OPTIONS,
    }
)
# wiotp-sdk subscribes every device to its commands on connect; quickstart has no commands and
# closes the connection on that subscription (180), which could race the event below.
qs_device._subscriptions.clear()
qs_device.connect()
qs_device.publishEvent(eventId="temp", msgFormat="json", data={"t": 20}, qos=0)
message = quickstart_events.get(timeout=WAIT)
assert message.topic == "iot-2/type/thermo/id/sdk-qs/evt/temp/fmt/json", message.topic
qs_device.disconnect()
viewer.loop_stop()
print("wiotp-sdk flow ok")
