//! The proxy in front of a broker cluster (`upstream.addresses`): connections spread over the
//! nodes, a node that dies has its clients closed with 92 and they reconnect through the proxy
//! to the nodes that are left, new connections pass a dead node over, and a node that comes back
//! is used again. Against two Mosquittos (independent brokers, which the proxy cannot tell from
//! a cluster: quick, and MQTT 5), and a 3-node NATS cluster with JetStream clustered, where no
//! QoS 1 message the broker acknowledged is lost.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
use rumqttc::v5::{AsyncClient as AsyncClient5, Event as Event5, MqttOptions as MqttOptions5};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use support::brokers::{BrokerKind, NatsCluster};
use support::http_get;
use support::{poll_until, standard_policy, v4, Broker, Warden, WAIT};

const ADMIN: &str = "admin: { bind: \"127.0.0.1:0\" }\n";

/// The standard policy with org1 devices `sensor/dev3` to `sensor/dev6` besides dev1 and dev2
/// (token `DEVICE-token`).
fn policy() -> String {
    let more: String = (3..=6)
        .map(|n| {
            format!(
                "      sensor/dev{n}: {{ token: \"{}\" }}\n",
                support::sha256_token(&format!("dev{n}-token"))
            )
        })
        .collect();
    let policy = standard_policy();
    let anchor = "      edge-gw/gw1:";
    assert!(policy.contains(anchor));
    policy.replacen(anchor, &format!("{more}{anchor}"), 1)
}

/// The value of the series `name{labels}` in the proxy's metrics (0 when absent).
fn metric(warden: &Warden, name: &str, labels: &str) -> i64 {
    let prefix = format!("{name}{{{labels}");
    warden
        .running
        .metrics
        .render()
        .lines()
        .find(|line| line.starts_with(&prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

/// Connections the proxy holds to each node.
fn node_connections(warden: &Warden, nodes: usize) -> Vec<i64> {
    (0..nodes)
        .map(|i| {
            metric(
                warden,
                "warden_upstream_node_connections",
                &format!("node=\"{i}\""),
            )
        })
        .collect()
}

/// The node whose connection count grew from `before` (exactly one must have).
fn grown_node(warden: &Warden, before: &[i64]) -> usize {
    let after = node_connections(warden, before.len());
    let grown: Vec<usize> = (0..before.len())
        .filter(|&i| after[i] > before[i])
        .collect();
    assert_eq!(grown.len(), 1, "one node more: {before:?} → {after:?}");
    grown[0]
}

/// An MQTT 5 client of the proxy: its events, and the server's DISCONNECT when it comes.
struct Client5 {
    client: AsyncClient5,
    events: tokio::sync::mpsc::UnboundedReceiver<Result<Packet5, String>>,
}

async fn connect5(addr: SocketAddr, device: &str) -> Client5 {
    let mut options = MqttOptions5::new(
        format!("d:org1:sensor:{device}"),
        addr.ip().to_string(),
        addr.port(),
    );
    options.set_credentials("use-token-auth", format!("{device}-token"));
    let (client, mut eventloop) = AsyncClient5::new(options, 100);
    tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event5::Incoming(Packet5::ConnAck(_))) => return,
                Ok(_) => {}
                Err(error) => panic!("{device}: {error}"),
            }
        }
    })
    .await
    .expect("CONNACK in time");
    let (tx, events) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event5::Incoming(packet)) => {
                    if tx.send(Ok(packet)).is_err() {
                        return;
                    }
                }
                Ok(Event5::Outgoing(_)) => {}
                Err(error) => {
                    let _ = tx.send(Err(error.to_string()));
                    return;
                }
            }
        }
    });
    Client5 { client, events }
}

impl Client5 {
    /// Waits for the server's DISCONNECT and returns what rumqttc says of it.
    async fn closed(&mut self) -> String {
        tokio::time::timeout(WAIT, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(Packet5::Disconnect(disconnect))) => {
                        return format!("{disconnect:?}");
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return error,
                    None => return "event loop ended".into(),
                }
            }
        })
        .await
        .expect("the connection closes")
    }

    async fn publish_acked(&mut self, topic: &str) -> bool {
        self.client
            .publish(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, "x")
            .await
            .expect("publish queued");
        tokio::time::timeout(WAIT, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(Packet5::PubAck(_))) => return true,
                    Some(Ok(_)) => {}
                    _ => return false,
                }
            }
        })
        .await
        .unwrap_or(false)
    }
}

#[tokio::test]
async fn a_dead_node_closes_its_clients_with_92_and_they_reconnect_to_the_node_left() {
    let mut brokers = [Some(Broker::start().await), Some(Broker::start().await)];
    let addresses: Vec<String> = brokers.iter().flatten().map(Broker::addr).collect();
    let warden = Warden::start_nodes(&addresses, &policy(), "", ADMIN).await;
    let admin = warden.running.admin_addr.expect("admin endpoint");
    warden.wait_monitor_connected().await;

    // Connections spread: each device lands on the node with fewer connections.
    let mut devices = Vec::new();
    let mut on_node = Vec::new();
    for device in ["dev1", "dev2", "dev3", "dev4"] {
        let before = node_connections(&warden, 2);
        devices.push(v4::org1_device(warden.addr, device).await);
        on_node.push(grown_node(&warden, &before));
    }
    assert!(
        on_node.contains(&0) && on_node.contains(&1),
        "devices on both nodes: {on_node:?}"
    );
    let before = node_connections(&warden, 2);
    let mut v5 = connect5(warden.addr, "dev5").await;
    let dead = grown_node(&warden, &before);
    let left = 1 - dead;
    let (status, body) = http_get(admin, "/readyz").await;
    assert_eq!(status, 200);
    assert!(
        body.contains(&format!("node {dead} {} up", addresses[dead])),
        "{body}"
    );

    // kill -9 the MQTT 5 device's node: every session on it ends with 92.
    if let Some(broker) = brokers[dead].take() {
        broker.stop().await;
    }
    let closed = v5.closed().await;
    assert!(
        closed.contains("UnspecifiedError")
            && closed.contains("The connection was closed by the server"),
        "MQTT 5: DISCONNECT 0x80: {closed}"
    );
    let mut lost = 0;
    for (device, node) in devices.iter_mut().zip(&on_node) {
        if *node == dead {
            device.closed().await;
            lost += 1;
        }
    }
    let closes_92 = || metric(&warden, "warden_closes_total", "code=\"92\",org=\"org1\"");
    poll_until(
        WAIT,
        "every session of the dead node closed with 92",
        || async { (closes_92() == lost + 1).then_some(()) },
    )
    .await;
    // The sessions on the other node stay.
    for (device, node) in devices.iter_mut().zip(&on_node) {
        if *node == left {
            assert!(
                device
                    .publish_acked("iot-2/evt/e/fmt/json", b"{}".to_vec())
                    .await
            );
        }
    }

    // The node is marked down (its lost connections had it probed), and the proxy stays ready.
    poll_until(WAIT, "the dead node is marked down", || async {
        (metric(
            &warden,
            "warden_upstream_node_up",
            &format!("node=\"{dead}\""),
        ) == 0)
            .then_some(())
    })
    .await;
    // Ready, once the control connection is up again (it may have been on the dead node).
    let down = format!("node {dead} {} down", addresses[dead]);
    poll_until(WAIT, "/readyz: ready, and the dead node down", || async {
        let (status, body) = http_get(admin, "/readyz").await;
        (status == 200 && body.contains(&down)).then_some(())
    })
    .await;

    // The client reconnects through the proxy and lands on the node that is left, at once.
    let mut v5 = connect5(warden.addr, "dev5").await;
    assert!(v5.publish_acked("iot-2/evt/e/fmt/json").await);
    assert_eq!(
        node_connections(&warden, 2)[dead],
        0,
        "nothing goes to the dead node"
    );

    // The node comes back on its port: its probe finds it, and new connections go there again.
    let port = addresses[dead]
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap();
    let Some(_back) = Broker::start_on(port, "").await else {
        eprintln!("port {port} was taken in between by another process: the return is not checked");
        return;
    };
    poll_until(Duration::from_secs(15), "the node is up again", || async {
        let (_, body) = http_get(admin, "/readyz").await;
        body.contains(&format!("node {dead} {} up", addresses[dead]))
            .then_some(())
    })
    .await;
    let before = node_connections(&warden, 2);
    let _device = v4::org1_device(warden.addr, "dev6").await;
    assert_eq!(grown_node(&warden, &before), dead, "the node with fewest");
}

#[tokio::test]
async fn a_connect_passes_a_node_that_is_down_over_without_an_error() {
    let broker = Broker::start().await;
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let warden = Warden::start_nodes(&[dead.clone(), broker.addr()], &policy(), "", ADMIN).await;
    for device in ["dev1", "dev2", "dev3"] {
        let mut client = v4::org1_device(warden.addr, device).await;
        assert!(
            client
                .publish_acked("iot-2/evt/e/fmt/json", b"{}".to_vec())
                .await
        );
    }
    assert_eq!(node_connections(&warden, 2)[0], 0);
    assert_eq!(
        metric(&warden, "warden_upstream_node_up", "node=\"0\""),
        0,
        "{dead} is marked down"
    );
    assert!(
        metric(
            &warden,
            "warden_upstream_node_dial_failures_total",
            "node=\"0\""
        ) <= 2,
        "a node that is down is not dialled by every CONNECT"
    );
}

/// What the publishing device saw.
#[derive(Debug, Default)]
struct DeviceLog {
    /// Payloads (sequence numbers) the broker acknowledged, in order.
    acked: Vec<u32>,
    /// Connections through the proxy that ended under it.
    closes: u32,
    /// CONNECTs the proxy refused (a node election under way, say), retried.
    refused: u32,
    /// Messages acknowledged when the first connection ended.
    acked_at_first_close: Option<usize>,
}

/// A device that publishes QoS 1 messages one at a time, each waiting for its PUBACK, and
/// reconnects through the proxy whenever its connection ends, until `stop`.
async fn publish_in_a_loop(
    addr: SocketAddr,
    log: Arc<Mutex<DeviceLog>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut next = 0u32;
    while !*stop.borrow() {
        let mut device = match v4::connect(
            addr,
            "d:org1:sensor:dev1",
            Some("use-token-auth"),
            Some("dev1-token"),
        )
        .await
        {
            Ok(device) => device,
            Err(_) => {
                log.lock().unwrap().refused += 1;
                tokio::time::sleep(Duration::from_millis(200)).await; // sleep-ok: a client's pause before it retries a refused CONNECT
                continue;
            }
        };
        loop {
            let acked = tokio::select! {
                acked = device.publish_acked("iot-2/evt/seq/fmt/txt", next.to_string().into_bytes()) => acked,
                _ = stop.wait_for(|stop| *stop) => return,
            };
            if !acked {
                let mut log = log.lock().unwrap();
                log.closes += 1;
                log.acked_at_first_close = log.acked_at_first_close.or(Some(log.acked.len()));
                drop(log);
                break;
            }
            log.lock().unwrap().acked.push(next);
            next += 1;
        }
    }
}

/// An application with a persistent session, subscribed at QoS 1 to the device's events, that
/// reconnects through the proxy whenever its connection ends; what it received goes into
/// `received`. Returns once the first SUBACK is in.
async fn subscribe_persistently(addr: SocketAddr, received: Arc<Mutex<BTreeSet<u32>>>) {
    let mut options = MqttOptions::new("a:org1:watcher", addr.ip().to_string(), addr.port());
    options.set_credentials("a-org1-key0000001", "app-token");
    options.set_clean_session(false);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    client
        .subscribe(
            "iot-2/type/sensor/id/dev1/evt/seq/fmt/txt",
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let (subscribed, suback) = tokio::sync::oneshot::channel();
    let mut subscribed = Some(subscribed);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(subscribed) = subscribed.take() {
                        let _ = subscribed.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if let Some(n) = std::str::from_utf8(&publish.payload)
                        .ok()
                        .and_then(|text| text.parse().ok())
                    {
                        received.lock().unwrap().insert(n);
                    }
                }
                Ok(_) => {}
                // rumqttc reconnects on the next poll, with the same persistent session.
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await, // sleep-ok: a client's pause before it reconnects
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(20), suback)
        .await
        .expect("SUBACK in time")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_node_killed_under_qos1_traffic_loses_no_acknowledged_message() {
    let mut cluster = NatsCluster::start(BrokerKind::Nats, 3).await;
    let warden = Warden::start_nodes(
        &cluster.addresses(),
        &policy(),
        "  broker: nats\n  control_client_id: warden_cluster_test\n",
        ADMIN,
    )
    .await;
    let admin = warden.running.admin_addr.expect("admin endpoint");

    let received = Arc::new(Mutex::new(BTreeSet::new()));
    subscribe_persistently(warden.addr, received.clone()).await;
    // More devices, so that the connections spread over the nodes.
    let mut others = Vec::new();
    for device in ["dev2", "dev3"] {
        others.push(v4::org1_device(warden.addr, device).await);
    }
    let log = Arc::new(Mutex::new(DeviceLog::default()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let device = tokio::spawn(publish_in_a_loop(warden.addr, log.clone(), stopped));
    let acked = || log.lock().unwrap().acked.len();
    poll_until(Duration::from_secs(20), "the device publishes", || async {
        (acked() >= 10).then_some(())
    })
    .await;
    let mut nodes = BTreeSet::new();
    for client_id in [
        "d:org1:sensor:dev1",
        "d:org1:sensor:dev2",
        "d:org1:sensor:dev3",
        "a:org1:watcher",
    ] {
        let node = cluster.mqtt_client_node(client_id).await;
        nodes.insert(node.unwrap_or_else(|| panic!("{client_id} has a node")));
    }
    assert!(
        nodes.len() >= 2,
        "connections spread over the nodes: {nodes:?}"
    );

    // kill -9 the node that holds the device's upstream connection, under traffic.
    let dead = cluster
        .mqtt_client_node("d:org1:sensor:dev1")
        .await
        .expect("the device's node");
    let acked_before_kill = acked();
    let killed = tokio::time::Instant::now();
    cluster.kill(dead).await;
    poll_until(
        Duration::from_secs(25),
        "a PUBACK after the reconnect",
        || async {
            let log = log.lock().unwrap();
            log.acked_at_first_close
                .is_some_and(|at| log.acked.len() > at)
                .then_some(())
        },
    )
    .await;
    let resumed = killed.elapsed();

    // The device is closed (92), reconnects through the proxy to another node, and goes on.
    poll_until(
        Duration::from_secs(25),
        "the device goes on after a reconnect",
        || async {
            let log = log.lock().unwrap();
            (log.closes >= 1 && log.acked.len() >= acked_before_kill + 10).then_some(())
        },
    )
    .await;
    let now_on = cluster
        .mqtt_client_node("d:org1:sensor:dev1")
        .await
        .expect("the device is connected again");
    assert_ne!(now_on, dead);
    let _ = stop.send(true);
    device.await.unwrap();
    assert!(
        metric(&warden, "warden_closes_total", "code=\"92\",org=\"org1\"") >= 1,
        "the device's session closed with 92"
    );
    let down = format!("node {dead} {} down", cluster.addresses()[dead]);
    poll_until(WAIT, "/readyz says the dead node is down", || async {
        http_get(admin, "/readyz")
            .await
            .1
            .contains(&down)
            .then_some(())
    })
    .await;

    // Every message the broker acknowledged reaches the application.
    let acked: Vec<u32> = log.lock().unwrap().acked.clone();
    let missing = || {
        let received = received.lock().unwrap();
        acked
            .iter()
            .filter(|n| !received.contains(n))
            .copied()
            .collect::<Vec<u32>>()
    };
    let result = tokio::time::timeout(Duration::from_secs(20), async {
        while !missing().is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await; // sleep-ok: deliveries arrive on the application's own task
        }
    })
    .await;
    let log = log.lock().unwrap();
    assert!(
        result.is_ok(),
        "acknowledged but never delivered: {:?} (acked {}, closes {}, refused {})",
        missing(),
        log.acked.len(),
        log.closes,
        log.refused
    );
    eprintln!(
        "node {dead} killed: first PUBACK after the reconnect {resumed:?} later; {} acked, {} closes, {} CONNECTs refused while the cluster recovered",
        log.acked.len(),
        log.closes,
        log.refused
    );
    drop(others);
}
