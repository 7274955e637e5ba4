// MQTT.js (from npm, unmodified) over WebSocket through mqtt-warden: an MQTT 5 application
// subscribes to device events, an MQTT 3.1.1 device publishes one, the application receives it
// and sends a command that the device receives.
//
// Usage: node ws_flow.mjs PORT
import mqtt from "mqtt";

const port = Number(process.argv[2]);
const url = `ws://127.0.0.1:${port}/any/path`;
const WAIT_MS = 10_000;

function within(promise, what) {
  return Promise.race([
    promise,
    // unref: a pending deadline must not keep node running after the flow is done.
    new Promise((_, reject) =>
      setTimeout(() => reject(new Error(`timed out: ${what}`)), WAIT_MS).unref(),
    ),
  ]);
}

function nextMessage(client, topic) {
  return within(
    new Promise((resolve) => {
      client.on("message", (t, payload) => {
        if (t === topic) resolve(payload.toString());
      });
    }),
    `message on ${topic}`,
  );
}

const app = await within(
  mqtt.connectAsync(url, {
    clientId: "a:org1:mqttjs",
    username: "a-org1-key0000001",
    password: "app-token",
    protocolVersion: 5,
    reconnectPeriod: 0,
  }),
  "application connects",
);
await within(app.subscribeAsync("iot-2/type/+/id/+/evt/+/fmt/+", { qos: 1 }), "subscribe");

const device = await within(
  mqtt.connectAsync(url, {
    clientId: "d:org1:sensor:dev1",
    username: "use-token-auth",
    password: "dev1-token",
    protocolVersion: 4,
    reconnectPeriod: 0,
  }),
  "device connects",
);
await within(device.subscribeAsync("iot-2/cmd/+/fmt/+", { qos: 1 }), "device subscribes");

const event = nextMessage(app, "iot-2/type/sensor/id/dev1/evt/temp/fmt/json");
await device.publishAsync("iot-2/evt/temp/fmt/json", JSON.stringify({ celsius: 20 }), { qos: 1 });
const received = JSON.parse(await event);
if (received.celsius !== 20) throw new Error(`unexpected event ${JSON.stringify(received)}`);

const command = nextMessage(device, "iot-2/cmd/reboot/fmt/json");
await app.publishAsync("iot-2/type/sensor/id/dev1/cmd/reboot/fmt/json", "{}", { qos: 1 });
await command;

await device.endAsync();
await app.endAsync();
console.log("mqtt.js flow ok");
