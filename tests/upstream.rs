//! How the proxy reaches the broker: connections to the broker come from the configured source
//! addresses in turn (`upstream.source_addresses`), traffic flows across them, and a source the
//! host does not have stops the start.

mod support;

use mqtt_warden::config::WardenConfig;
use mqtt_warden::proxy;
use rumqttc::QoS;

use support::{standard_policy, v4, Broker, Warden, WAIT};

/// The source address of the next connection Mosquitto logs, within [`WAIT`].
async fn next_connection_source(broker: &mut Broker) -> String {
    tokio::time::timeout(WAIT, async {
        while let Some(line) = broker.log.recv().await {
            // "New client connected from 127.0.0.2:40512 as ..."
            if let Some(rest) = line.split("New client connected from ").nth(1) {
                let address = rest.split_whitespace().next().unwrap_or_default();
                let (host, _port) = address.rsplit_once(':').expect("HOST:PORT");
                return host.to_string();
            }
        }
        panic!("the broker's log ended");
    })
    .await
    .expect("the broker logs a connection")
}

#[tokio::test]
async fn broker_connections_come_from_the_source_addresses_in_turn() {
    let mut broker = Broker::start().await;
    let warden = Warden::start_upstream(
        &broker,
        &standard_policy(),
        "  - bind: \"127.0.0.1:0\"",
        "  source_addresses: [\"127.0.0.2\", \"127.0.0.3\"]",
        "",
    )
    .await;
    warden.wait_monitor_connected().await;
    let mut sources = vec![next_connection_source(&mut broker).await];

    let mut app = v4::org1_app(warden.addr, "a:org1:watcher").await;
    sources.push(next_connection_source(&mut broker).await);
    let device = v4::org1_device(warden.addr, "dev1").await;
    sources.push(next_connection_source(&mut broker).await);
    // Control connection, application, device: alternating, never the kernel's default.
    assert_ne!(sources[1], sources[2], "{sources:?}");
    for source in &sources {
        assert!(
            source == "127.0.0.2" || source == "127.0.0.3",
            "{sources:?}"
        );
    }

    app.subscribe("iot-2/type/sensor/id/dev1/evt/+/fmt/+", QoS::AtLeastOnce)
        .await;
    device
        .client
        .publish("iot-2/evt/temp/fmt/json", QoS::AtLeastOnce, false, "{}")
        .await
        .unwrap();
    let event = app.next_publish().await;
    assert_eq!(event.topic, "iot-2/type/sensor/id/dev1/evt/temp/fmt/json");
}

#[tokio::test]
async fn a_source_address_this_host_lacks_stops_the_start() {
    let broker = Broker::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), standard_policy()).unwrap();
    let path = dir.path().join("warden.yaml");
    // 192.0.2.1 is TEST-NET-1: never an address of this host.
    let text = format!(
        "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  address: \"{}\"\n  source_addresses: [\"127.0.0.2\", \"192.0.2.1\"]\npolicies: policy.yaml\n",
        broker.addr()
    );
    let config = WardenConfig::from_yaml(&text, &path).expect("valid config");
    let error = match proxy::start(config).await {
        Ok(_) => panic!("the proxy started with a source address the host does not have"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains("upstream.source_addresses") && error.contains("192.0.2.1"),
        "{error}"
    );
}
