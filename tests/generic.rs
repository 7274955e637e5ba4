//! Generic tenants against a real Mosquitto: rule order and variables, the receive check,
//! isolation between two tenants and a WIoTP org (seen by a spy subscribed to `#` on the broker
//! itself), client-ID namespacing and assigned IDs, reload of rules under traffic, `explain`
//! agreeing with the MQTT 5 reason string, `check` errors, and the Mosquitto importer.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use mqtt_warden::codec::ProtocolVersion;
use rumqttc::{QoS, SubscribeReasonCode};
use support::{raw, sha256_token, v4, Broker, Warden, WAIT};
use tokio::io::AsyncWriteExt;

const BIN: &str = env!("CARGO_BIN_EXE_mqtt-warden");

/// Two tenants and one WIoTP org.
fn policy() -> String {
    format!(
        r##"orgs:
  org1:
    limits: {{ publish_rate: {{ device: "100000/s", gateway: "100000/s", application: "100000/s" }} }}
    device_types: {{ sensor: {{}} }}
    devices:
      sensor/dev1: {{ token: "{dev}" }}
    api_keys:
      a-org1-key0000001: {{ token: "{app}" }}
tenants:
  lab:
    anonymous: true
    users:
      alice: {{ token: "{alice}", client_ids: ["alice-*"] }}
      ops1: {{ token: "{alice}", groups: [ops] }}
    rules:
      - {{ allow: [publish, subscribe], topic: "devices/%c/#" }}
      - {{ allow: [subscribe], topic: "devices/+/#", groups: [ops] }}
      - {{ deny: [publish, subscribe], topic: "devices/#" }}
      - {{ deny: [receive], topic: "fleet/secret/#" }}
      - {{ allow: [publish, subscribe], topic: "fleet/#" }}
      - {{ deny: [subscribe], topic: "test/nosubscribe" }}
      - {{ allow: [publish, subscribe], topic: "#" }}
      - {{ allow: [publish, subscribe], topic: "$events/#" }}
    limits: {{ publish_rate: {{ application: "100000/s" }} }}
  shop:
    mount: "customers/shop/"
    users:
      alice: {{ token: "{shop}" }}
    rules:
      - {{ allow: [publish, subscribe], topic: "#" }}
    limits: {{ publish_rate: {{ application: "100000/s" }} }}
"##,
        dev = sha256_token("dev1-token"),
        app = sha256_token("app-token"),
        alice = sha256_token("alice-pw"),
        shop = sha256_token("shop-pw"),
    )
}

/// A proxy with a plain listener (`addr`) and one of tenant `lab` (`listen_addrs[1]`).
async fn start(broker: &Broker, policy: &str) -> Warden {
    Warden::start_listeners(
        broker,
        policy,
        "  - bind: \"127.0.0.1:0\"\n  - bind: \"127.0.0.1:0\"\n    tenant: lab",
        "",
    )
    .await
}

fn lab_addr(warden: &Warden) -> SocketAddr {
    warden.running.listen_addrs[1]
}

async fn user(addr: SocketAddr, client_id: &str, user: &str, password: &str) -> v4::Client {
    v4::connect(addr, client_id, Some(user), Some(password))
        .await
        .unwrap_or_else(|refused| panic!("{client_id} refused: {refused:?}"))
}

async fn anonymous(warden: &Warden, client_id: &str) -> v4::Client {
    v4::connect(lab_addr(warden), client_id, None, None)
        .await
        .unwrap_or_else(|refused| panic!("{client_id} refused: {refused:?}"))
}

/// A client of the broker itself, subscribed to everything: what really reaches the broker.
struct Spy(v4::Client);

impl Spy {
    async fn start(broker: &Broker) -> Spy {
        let addr: SocketAddr = broker.addr().parse().unwrap();
        let mut client = v4::connect(addr, "spy", None, None)
            .await
            .expect("spy connects");
        client.subscribe("#", QoS::AtMostOnce).await;
        Spy(client)
    }

    /// Broker topics (the proxy's own ledger aside) until `last` arrives, in order.
    async fn until(&mut self, last: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let publish = self.0.next_publish().await;
            if publish.topic.starts_with("warden:") {
                continue;
            }
            let done = publish.topic == last;
            seen.push(publish.topic);
            if done {
                return seen;
            }
        }
    }

    /// Broker topics (the proxy's own ledger aside) until every one of `wanted` arrived.
    async fn until_all(&mut self, wanted: &[&str]) -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        while !wanted.iter().all(|w| seen.iter().any(|s| s == w)) {
            let publish = self.0.next_publish().await;
            if !publish.topic.starts_with("warden:") {
                seen.push(publish.topic);
            }
        }
        seen
    }
}

/// Topics a client receives until `last`, in order.
async fn received_until(client: &mut v4::Client, last: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let topic = client.next_publish().await.topic;
        let done = topic == last;
        seen.push(topic);
        if done {
            return seen;
        }
    }
}

async fn publish(client: &v4::Client, topic: &str) {
    client
        .client
        .publish(topic, QoS::AtLeastOnce, false, "x")
        .await
        .expect("publish queued");
}

#[tokio::test]
async fn rules_decide_in_order_with_variables_and_deliveries_are_checked() {
    let broker = Broker::start().await;
    let warden = start(&broker, &policy()).await;
    let mut spy = Spy::start(&broker).await;
    let alice = user(warden.addr, "alice-1", "alice@lab", "alice-pw").await;
    let mut watcher = anonymous(&warden, "watcher").await;
    watcher.subscribe("#", QoS::AtLeastOnce).await;

    // %c: alice may publish under her own client ID only; first match wins.
    publish(&alice, "devices/alice-1/temp").await;
    publish(&alice, "devices/alice-2/temp").await;
    publish(&alice, "done/1").await;
    assert_eq!(
        spy.until("lab/done/1").await,
        ["lab/devices/alice-1/temp", "lab/done/1"],
        "the refused publish never reaches the broker"
    );
    assert_eq!(
        received_until(&mut watcher, "done/1").await,
        ["devices/alice-1/temp", "done/1"]
    );

    // A deny of subscribing: SUBACK failure, the connection stays.
    let mut alice = alice;
    assert_eq!(
        alice
            .subscribe_codes("test/nosubscribe", QoS::AtLeastOnce)
            .await,
        [SubscribeReasonCode::Failure]
    );
    // Groups: ops may watch every device, alice only her own.
    let mut ops = user(warden.addr, "ops-1", "ops1@lab", "alice-pw").await;
    ops.subscribe("devices/+/#", QoS::AtLeastOnce).await;
    assert_eq!(
        alice.subscribe_codes("devices/+/#", QoS::AtLeastOnce).await,
        [SubscribeReasonCode::Failure]
    );

    // The receive check: fleet/# may be subscribed, fleet/secret/... is never delivered.
    let mut fleet = anonymous(&warden, "fleet-watcher").await;
    fleet.subscribe("fleet/#", QoS::AtLeastOnce).await;
    publish(&alice, "fleet/a/status").await;
    publish(&alice, "fleet/secret/key").await;
    publish(&alice, "fleet/b/status").await;
    assert_eq!(
        received_until(&mut fleet, "fleet/b/status").await,
        ["fleet/a/status", "fleet/b/status"]
    );
    assert!(spy
        .until("lab/fleet/b/status")
        .await
        .contains(&"lab/fleet/secret/key".to_owned()));

    // Wildcards of a tenant do not reach $ topics.
    assert_eq!(
        alice.subscribe_codes("$SYS/#", QoS::AtLeastOnce).await,
        [SubscribeReasonCode::Failure]
    );
}

/// Under the mount a tenant's `$events/...` is an ordinary topic at the broker, where `lab/#`
/// matches it; the proxy still keeps it from wildcard subscriptions, as MQTT says.
#[tokio::test]
async fn dollar_topics_reach_only_subscriptions_that_name_them() {
    let broker = Broker::start().await;
    let warden = start(&broker, &policy()).await;
    let mut spy = Spy::start(&broker).await;
    let mut everything = anonymous(&warden, "everything").await;
    everything.subscribe("#", QoS::AtLeastOnce).await;
    let mut shared = anonymous(&warden, "shared").await;
    shared.subscribe("$share/g/#", QoS::AtLeastOnce).await;
    let mut events = anonymous(&warden, "events").await;
    events.subscribe("$events/+", QoS::AtLeastOnce).await;
    let publisher = anonymous(&warden, "publisher").await;

    publish(&publisher, "$events/c1").await;
    publish(&publisher, "plain/1").await;
    assert_eq!(
        spy.until("lab/plain/1").await,
        ["lab/$events/c1", "lab/plain/1"],
        "the broker has the $ topic, inside the mount"
    );
    assert_eq!(
        received_until(&mut everything, "plain/1").await,
        ["plain/1"]
    );
    assert_eq!(received_until(&mut shared, "plain/1").await, ["plain/1"]);
    assert_eq!(events.next_publish().await.topic, "$events/c1");
}

#[tokio::test]
async fn tenants_and_an_org_are_isolated_at_the_broker() {
    let broker = Broker::start().await;
    let warden = start(&broker, &policy()).await;
    let mut spy = Spy::start(&broker).await;

    let mut lab = anonymous(&warden, "lab-all").await;
    lab.subscribe("#", QoS::AtLeastOnce).await;
    let mut lab_shared = anonymous(&warden, "lab-shared").await;
    lab_shared.subscribe("$share/g/#", QoS::AtLeastOnce).await;
    let mut shop = user(warden.addr, "shop-all", "alice@shop", "shop-pw").await;
    shop.subscribe("#", QoS::AtLeastOnce).await;
    shop.subscribe("$share/g/#", QoS::AtLeastOnce).await;
    let mut app = v4::org1_app(warden.addr, "a:org1:all").await;
    app.subscribe("iot-2/type/+/id/+/evt/+/fmt/+", QoS::AtLeastOnce)
        .await;
    let device = v4::connect(
        warden.addr,
        "d:org1:sensor:dev1",
        Some("use-token-auth"),
        Some("dev1-token"),
    )
    .await
    .unwrap();

    let lab_pub = anonymous(&warden, "lab-pub").await;
    let shop_pub = user(warden.addr, "shop-pub", "alice@shop", "shop-pw").await;
    publish(&lab_pub, "x/y").await;
    publish(&shop_pub, "x/y").await;
    device
        .client
        .publish("iot-2/evt/e/fmt/txt", QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    publish(&lab_pub, "end").await;
    publish(&shop_pub, "end").await;

    // Everything reaches the broker under its own space, and nothing else does.
    let mut at_broker = spy
        .until_all(&[
            "lab/end",
            "customers/shop/end",
            "org1/iot-2/type/sensor/id/dev1/evt/e/fmt/txt",
        ])
        .await;
    at_broker.retain(|t| !t.ends_with("/mon"));
    at_broker.sort();
    assert_eq!(
        at_broker,
        [
            "customers/shop/end",
            "customers/shop/x/y",
            "lab/end",
            "lab/x/y",
            "org1/iot-2/type/sensor/id/dev1/evt/e/fmt/txt",
        ]
    );

    assert_eq!(received_until(&mut lab, "end").await, ["x/y", "end"]);
    assert_eq!(received_until(&mut lab_shared, "end").await, ["x/y", "end"]);
    let shop_seen = received_until(&mut shop, "end").await;
    assert!(
        shop_seen.iter().all(|t| t == "x/y" || t == "end"),
        "{shop_seen:?}"
    );
    assert_eq!(
        app.next_publish().await.topic,
        "iot-2/type/sensor/id/dev1/evt/e/fmt/txt"
    );
    assert!(
        app.next_publish_within(Duration::from_millis(300))
            .await
            .is_none(),
        "the org sees nothing of the tenants"
    );
}

#[tokio::test]
async fn client_ids_are_namespaced_per_tenant_and_assigned_when_empty() {
    let mut broker = Broker::start().await;
    let warden = start(&broker, &policy()).await;
    let mut spy = Spy::start(&broker).await;

    let lab_dev1 = anonymous(&warden, "dev1").await;
    let mut shop_dev1 = user(warden.addr, "dev1", "alice@shop", "shop-pw").await;
    // Both live: the shop's dev1 did not take the lab's over.
    publish(&lab_dev1, "from-lab").await;
    publish(&shop_dev1, "from-shop").await;
    spy.until_all(&["lab/from-lab", "customers/shop/from-shop"])
        .await;
    let mut connected = Vec::new();
    tokio::time::timeout(WAIT, async {
        while connected.len() < 2 {
            let line = broker.log.recv().await.expect("broker log");
            for id in ["lab/dev1", "shop/dev1"] {
                if line.contains(&format!(" as {id} ")) {
                    connected.push(id);
                }
            }
        }
    })
    .await
    .expect("both clients reach the broker under their tenant's ID");

    // A second lab dev1 takes the lab's over, never the shop's.
    let mut lab_dev1 = lab_dev1;
    let _lab_dev1_again = anonymous(&warden, "dev1").await;
    lab_dev1.closed().await;
    shop_dev1.subscribe("still/here", QoS::AtLeastOnce).await;

    // A zero-length client ID gets an assigned one (MQTT 5: in the CONNACK).
    let (mut stream, connack) =
        raw::connect(lab_addr(&warden), ProtocolVersion::V5, "", None, None, 30).await;
    assert_eq!(connack[3], 0, "CONNACK success: {connack:?}");
    let text = String::from_utf8_lossy(&connack).into_owned();
    let at = text.find("auto-").expect("Assigned Client Identifier");
    let assigned = text[at..at + 21].to_owned();
    let (_, connack2) =
        raw::connect(lab_addr(&warden), ProtocolVersion::V311, "", None, None, 30).await;
    assert_eq!(connack2, [0x20, 0x02, 0x00, 0x00]);
    // The assigned client publishes; the broker knows it as lab/auto-....
    let topic = b"anon";
    let mut packet = vec![0x30, (2 + topic.len() + 1 + 1) as u8, 0, topic.len() as u8];
    packet.extend_from_slice(topic);
    packet.extend_from_slice(&[0, b'!']);
    stream.write_all(&packet).await.unwrap();
    spy.until("lab/anon").await;
    tokio::time::timeout(WAIT, async {
        loop {
            let line = broker.log.recv().await.expect("broker log");
            if line.contains(&format!(" as lab/{assigned} ")) {
                return;
            }
        }
    })
    .await
    .expect("the broker knows the assigned ID under the tenant");
}

#[tokio::test]
async fn rules_reload_under_traffic() {
    let broker = Broker::start_with("log_type debug").await;
    let mut broker = broker;
    let warden = start(&broker, &policy()).await;
    let mut spy = Spy::start(&broker).await;
    let mut subscriber = anonymous(&warden, "sub").await;
    subscriber.subscribe("data/#", QoS::AtLeastOnce).await;
    subscriber.subscribe("ok/#", QoS::AtLeastOnce).await;
    let publisher = anonymous(&warden, "pub").await;

    // Traffic all along: a task publishes data/N without pause until told to stop.
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let traffic = {
        let client = publisher.client.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                if stopped.try_recv().is_ok() {
                    return n;
                }
                client
                    .publish(format!("data/{n}"), QoS::AtLeastOnce, false, "x")
                    .await
                    .expect("publish queued");
                n += 1;
                tokio::task::yield_now().await;
            }
        })
    };
    assert!(subscriber.next_publish().await.topic.starts_with("data/"));

    // The edit: data/ may no longer be published or subscribed; ok/ still may.
    let edited = policy().replace(
        "      - { allow: [publish, subscribe], topic: \"devices/%c/#\" }\n",
        "      - { deny: [publish, subscribe], topic: \"data/#\" }\n      - { allow: [publish, subscribe], topic: \"devices/%c/#\" }\n",
    );
    assert_ne!(edited, policy());
    std::fs::write(warden.policy_path(), &edited).unwrap();
    warden.running.reload_policy().expect("the edit is valid");
    // The proxy takes the subscription back at the broker.
    tokio::time::timeout(WAIT, async {
        loop {
            let line = broker.log.recv().await.expect("broker log");
            if line.contains("Received UNSUBSCRIBE from lab/sub") {
                return;
            }
        }
    })
    .await
    .expect("the revoked subscription is unsubscribed");
    // From now on nothing of data/ reaches the broker or the subscriber; the publisher stays.
    // One connection keeps its order: data/after would reach the broker before ok/end.
    publish(&publisher, "data/after").await;
    publish(&publisher, "ok/end").await;
    let at_broker = spy.until("lab/ok/end").await;
    assert!(!at_broker.contains(&"lab/data/after".to_owned()));
    loop {
        let topic = subscriber.next_publish().await.topic;
        assert_ne!(topic, "data/after");
        if topic == "ok/end" {
            break;
        }
    }
    stop.send(()).unwrap();
    let sent = traffic.await.unwrap();
    assert!(sent > 0);
    // The publisher kept its connection through the reload.
    let mut publisher = publisher;
    publisher.subscribe("ok/#", QoS::AtLeastOnce).await;
}

/// Reads one packet: its first byte and its body.
async fn read_packet(stream: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(WAIT, async {
        let first = stream.read_u8().await.expect("a packet");
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let byte = stream.read_u8().await.expect("length");
            len |= usize::from(byte & 0x7F) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await.expect("body");
        (first, body)
    })
    .await
    .expect("a packet in time")
}

/// Sends an MQTT 5 PUBLISH at QoS 1, packet id 7, no properties, payload `x` (topics below 120
/// bytes).
async fn publish_v5(stream: &mut tokio::net::TcpStream, topic: &str) {
    let mut publish = vec![
        0x32,
        (2 + topic.len() + 2 + 1 + 1) as u8,
        0,
        topic.len() as u8,
    ];
    publish.extend_from_slice(topic.as_bytes());
    publish.extend_from_slice(&[0x00, 0x07, 0x00, b'x']);
    stream.write_all(&publish).await.unwrap();
}

/// The Reason String property of the properties that start (with their length) at `bytes`.
fn reason_string(bytes: &[u8]) -> String {
    let skip = bytes
        .iter()
        .position(|b| b & 0x80 == 0)
        .expect("a property length")
        + 1;
    let props = &bytes[skip..];
    assert_eq!(props[0], 0x1F, "a reason string property: {props:?}");
    let len = usize::from(u16::from_be_bytes([props[1], props[2]]));
    String::from_utf8(props[3..3 + len].to_vec()).unwrap()
}

/// The MQTT 5 reason string of a refused PUBACK and SUBACK, and `explain` on the same requests.
#[tokio::test]
async fn explain_names_the_rule_of_the_reason_string() {
    let broker = Broker::start().await;
    let warden = start(&broker, &policy()).await;
    let (mut stream, connack) = raw::connect(
        warden.addr,
        ProtocolVersion::V5,
        "alice-1",
        Some("alice@lab"),
        Some(b"alice-pw"),
        30,
    )
    .await;
    assert_eq!(connack[3], 0, "{connack:?}");
    publish_v5(&mut stream, "devices/alice-2/x").await;
    let (first, body) = read_packet(&mut stream).await;
    assert_eq!((first, &body[..3]), (0x40, &[0x00, 0x07, 0x87][..]));
    let puback_reason = reason_string(&body[3..]);
    let rule = format!(
        "rule {}:18 (deny [publish, subscribe] devices/#)",
        warden.policy_path().display()
    );
    assert!(puback_reason.ends_with(&rule), "{puback_reason}");

    // SUBSCRIBE packet id 9 to test/nosubscribe, no properties.
    let filter = b"test/nosubscribe";
    let mut subscribe = vec![
        0x82,
        (2 + 1 + 2 + filter.len() + 1) as u8,
        0x00,
        0x09,
        0x00,
        0x00,
        filter.len() as u8,
    ];
    subscribe.extend_from_slice(filter);
    subscribe.push(0x01);
    stream.write_all(&subscribe).await.unwrap();
    let (first, body) = read_packet(&mut stream).await;
    assert_eq!((first, &body[..2]), (0x90, &[0x00, 0x09][..]));
    assert_eq!(*body.last().unwrap(), 0x87);
    let suback_reason = reason_string(&body[2..]);

    let policy_path = warden.policy_path();
    let explain = |action: &str, topic: &str| {
        std::process::Command::new(BIN)
            .args(["explain", "--policy"])
            .arg(&policy_path)
            .args([
                "--tenant",
                "lab",
                "--user",
                "alice",
                "--client-id",
                "alice-1",
                action,
                topic,
            ])
            .output()
            .expect("the binary runs")
    };
    let denied = explain("publish", "devices/alice-2/x");
    assert_eq!(denied.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&denied.stdout),
        format!("deny: {rule}\n")
    );

    let allowed = explain("publish", "devices/alice-1/x");
    assert_eq!(allowed.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&allowed.stdout),
        format!(
            "allow: rule {}:16 (allow [publish, subscribe] devices/%c/#)\n",
            policy_path.display()
        )
    );
    let refused = explain("subscribe", "test/nosubscribe");
    let subscribe_rule = format!(
        "rule {}:21 (deny [subscribe] test/nosubscribe)",
        policy_path.display()
    );
    assert_eq!(
        String::from_utf8_lossy(&refused.stdout),
        format!("deny: {subscribe_rule}\n")
    );
    assert!(suback_reason.ends_with(&subscribe_rule), "{suback_reason}");
}

#[test]
fn check_reports_tenant_errors_with_lines() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    std::fs::write(&a, "tenants:\n  lab: {}\n").unwrap();
    let b = dir.path().join("b.yaml");
    std::fs::write(
        &b,
        "tenants:\n  lab: {}\n  other:\n    rules:\n      - { allow: [publish], topic: \"x/%q\" }\n      - { allow: [publish], topic: \"x/a+\" }\n      - { topic: \"y\" }\n",
    )
    .unwrap();
    let output = std::process::Command::new(BIN)
        .args(["check", "--policy"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        format!(
            "{}:2: tenants.lab: tenant `lab` is already defined in {}:2",
            b.display(),
            a.display()
        ),
        format!(
            "{}:5: tenants.other.rules[0].topic: unknown variable `%q`",
            b.display()
        ),
        format!(
            "{}:6: tenants.other.rules[1].topic: `+` must be a whole topic level",
            b.display()
        ),
        format!(
            "{}:7: tenants.other.rules[2]: a rule with no action",
            b.display()
        ),
    ] {
        assert!(stderr.contains(&expected), "{expected}\n---\n{stderr}");
    }
}

#[tokio::test]
async fn imports_a_mosquitto_acl_and_password_file() {
    let dir = tempfile::tempdir().unwrap();
    let passwords = dir.path().join("passwd");
    for (args, user) in [
        (vec!["-c", "-b"], ("alice", "alice-pw")),
        (vec!["-b"], ("bob", "bob-pw")),
    ] {
        let status = std::process::Command::new("mosquitto_passwd")
            .args(&args)
            .arg(&passwords)
            .args([user.0, user.1])
            .status()
            .expect("mosquitto_passwd is installed");
        assert!(status.success());
    }
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "# Mosquitto ACL\nuser alice\ntopic readwrite alice/#\ntopic deny alice/private\n\nuser bob\ntopic read alice/#\n\npattern readwrite clients/%c/#\n",
    )
    .unwrap();
    let output = std::process::Command::new(BIN)
        .args(["import", "mosquitto", "--tenant", "lab", "--acl-file"])
        .arg(&acl)
        .arg("--password-file")
        .arg(&passwords)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let yaml = String::from_utf8(output.stdout).unwrap();
    assert!(yaml.contains("$7$"), "{yaml}");

    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &yaml).await;
    let mut spy = Spy::start(&broker).await;
    // Users keep their Mosquitto passwords.
    let alice = user(warden.addr, "a1", "alice@lab", "alice-pw").await;
    let refused = v4::connect(warden.addr, "b1", Some("bob@lab"), Some("alice-pw")).await;
    assert!(refused.is_err());
    let mut bob = user(warden.addr, "b1", "bob@lab", "bob-pw").await;
    bob.subscribe("alice/#", QoS::AtLeastOnce).await;
    assert_eq!(
        bob.subscribe_codes("clients/other/#", QoS::AtLeastOnce)
            .await,
        [SubscribeReasonCode::Failure]
    );
    publish(&alice, "alice/private").await;
    publish(&alice, "alice/news").await;
    publish(&alice, "clients/a1/up").await;
    assert_eq!(
        spy.until("lab/clients/a1/up").await,
        ["lab/alice/news", "lab/clients/a1/up"]
    );
    assert_eq!(bob.next_publish().await.topic, "alice/news");
    // The bob connection's own pattern.
    publish(&bob, "alice/x").await;
    publish(&bob, "clients/b1/up").await;
    assert_eq!(spy.until("lab/clients/b1/up").await, ["lab/clients/b1/up"]);
}

/// `retained: strip` clears the flag at the broker, `deny` refuses a retained PUBLISH (MQTT 3:
/// acknowledged and dropped), and lifecycle events reach a subscriber inside the tenant.
#[tokio::test]
async fn retained_handling_and_lifecycle_events() {
    let policy = format!(
        r##"tenants:
  strip:
    anonymous: true
    retained: strip
    rules:
      - {{ allow: [publish, subscribe], topic: "#" }}
  refuse:
    anonymous: true
    retained: deny
    events: {{ topic: "$events/%c" }}
    users:
      watcher: {{ token: "{t}" }}
    rules:
      - {{ allow: [subscribe], topic: "$events/#", users: [watcher] }}
      - {{ allow: [publish, subscribe], topic: "#" }}
"##,
        t = sha256_token("w")
    );
    let broker = Broker::start().await;
    let warden = Warden::start_listeners(
        &broker,
        &policy,
        "  - bind: \"127.0.0.1:0\"\n  - bind: \"127.0.0.1:0\"\n    tenant: strip\n  - bind: \"127.0.0.1:0\"\n    tenant: refuse",
        "",
    )
    .await;
    let mut spy = Spy::start(&broker).await;
    let mut watcher = user(warden.addr, "w", "watcher@refuse", "w").await;
    watcher.subscribe("$events/#", QoS::AtLeastOnce).await;
    // A user name of a tenant must be a user, even where anonymous clients are admitted.
    assert!(v4::connect(warden.addr, "s0", Some("x@strip"), Some("x"))
        .await
        .is_err());
    let strip_client = v4::connect(warden.running.listen_addrs[1], "s1", None, None)
        .await
        .unwrap();
    let refuse_client = v4::connect(warden.running.listen_addrs[2], "r1", None, None)
        .await
        .unwrap();
    // The Connect event of r1 reaches the watcher, inside the tenant (its own may come first).
    let event = loop {
        let event = watcher.next_publish().await;
        if event.topic == "$events/r1" {
            break event;
        }
    };
    let event: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
    assert_eq!(event["Action"], "Connect");
    assert_eq!(event["Tenant"], "refuse");

    strip_client
        .client
        .publish("kept", QoS::AtLeastOnce, true, "x")
        .await
        .unwrap();
    refuse_client
        .client
        .publish("refused", QoS::AtLeastOnce, true, "x")
        .await
        .unwrap();
    refuse_client
        .client
        .publish("plain", QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    let seen = spy.until_all(&["strip/kept", "refuse/plain"]).await;
    assert!(!seen.contains(&"refuse/refused".to_owned()), "{seen:?}");
    // Nothing was retained for strip/kept: a new subscriber gets the retained marker (written
    // on the broker directly) and not the kept message, whose retained copy would come first.
    let addr: SocketAddr = broker.addr().parse().unwrap();
    let direct = v4::connect(addr, "marker", None, None).await.unwrap();
    direct
        .client
        .publish("strip/marker", QoS::AtLeastOnce, true, "m")
        .await
        .unwrap();
    spy.until("strip/marker").await;
    let mut late = v4::connect(addr, "late", None, None).await.unwrap();
    late.subscribe("strip/kept", QoS::AtLeastOnce).await;
    late.subscribe("strip/marker", QoS::AtLeastOnce).await;
    assert_eq!(late.next_publish().await.topic, "strip/marker");

    refuse_client.disconnect().await;
    let event = watcher.next_publish().await;
    assert_eq!(event.topic, "$events/r1");
    let event: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
    assert_eq!(event["Action"], "Disconnect");
    assert_eq!(event["CloseCode"], 0);
}

/// A client that sets Request Problem Information to 0 gets its refusals without a reason
/// string [MQTT-3.1.2-29].
#[tokio::test]
async fn no_reason_string_when_the_client_asks_for_none() {
    use mqtt_warden::codec::{encode_connect, property, Connect, Property, PropertyValue};

    let broker = Broker::start().await;
    let warden = start(&broker, &policy()).await;
    let mut packet = bytes::BytesMut::new();
    encode_connect(
        &mut packet,
        &Connect {
            version: ProtocolVersion::V5,
            clean_start: true,
            keep_alive: 30,
            properties: vec![Property {
                id: property::REQUEST_PROBLEM_INFORMATION,
                value: PropertyValue::Byte(0),
            }],
            client_id: "alice-1",
            will: None,
            username: Some("alice@lab"),
            password: Some(b"alice-pw"),
        },
    );
    let mut stream = tokio::net::TcpStream::connect(warden.addr).await.unwrap();
    stream.write_all(&packet).await.unwrap();
    let (first, _) = read_packet(&mut stream).await;
    assert_eq!(first, 0x20);
    publish_v5(&mut stream, "devices/alice-2/x").await;
    let (first, body) = read_packet(&mut stream).await;
    assert_eq!((first, body), (0x40, vec![0x00, 0x07, 0x87]));
}
