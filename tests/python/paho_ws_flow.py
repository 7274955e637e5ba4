"""paho-mqtt (unmodified) over WebSocket and secure WebSocket through mqtt-warden.

An MQTT 5 application subscribes over wss (TLS with the test CA), an MQTT 3.1.1 device and an
MQTT 3.1 device publish over plain ws, and the application receives both events.

Usage: python3 paho_ws_flow.py PORT TLS_PORT CA_FILE
"""
import queue
import sys
import threading

import paho.mqtt.client as paho

PORT, TLS_PORT, CA_FILE = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
WAIT = 10


def connected(client, host, port):
    """Connects, runs the network loop and waits for a successful CONNACK."""
    done = threading.Event()
    result = {}

    def on_connect(client, userdata, flags, rc, properties=None):
        result["rc"] = rc
        done.set()

    client.on_connect = on_connect
    client.connect(host, port, keepalive=30)
    client.loop_start()
    assert done.wait(WAIT), "CONNACK arrives"
    assert result["rc"] == 0, "connected: %s" % result["rc"]
    return client


events = queue.Queue()
app = paho.Client("a:org1:paho-wss", protocol=paho.MQTTv5, transport="websockets")
app.ws_set_options(path="/mqtt")
app.tls_set(ca_certs=CA_FILE)
app.username_pw_set("a-org1-key0000001", "app-token")
app.on_message = lambda client, userdata, message: events.put(message)
subscribed = threading.Event()
app.on_subscribe = lambda *args: subscribed.set()
connected(app, "localhost", TLS_PORT)
app.subscribe("iot-2/type/+/id/+/evt/+/fmt/+", qos=1)
assert subscribed.wait(WAIT), "subscribed"

for client_id, protocol in (("d:org1:sensor:dev1", paho.MQTTv311), ("d:org1:sensor:dev2", paho.MQTTv31)):
    device = paho.Client(client_id, protocol=protocol, transport="websockets")
    device.username_pw_set("use-token-auth", client_id.rsplit(":", 1)[1] + "-token")
    connected(device, "127.0.0.1", PORT)
    info = device.publish("iot-2/evt/temp/fmt/txt", b"over ws", qos=1)
    info.wait_for_publish(WAIT)
    message = events.get(timeout=WAIT)
    assert message.topic == "iot-2/type/sensor/id/%s/evt/temp/fmt/txt" % client_id.rsplit(":", 1)[1], message.topic
    assert message.payload == b"over ws"
    device.disconnect()
    device.loop_stop()

app.disconnect()
app.loop_stop()
print("paho ws flow ok")
