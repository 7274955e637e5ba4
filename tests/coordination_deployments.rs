//! Coordination through Redis deployments other than one plain server: a real three-master Redis
//! Cluster (`coordination.redis_cluster`), and a Redis that serves only TLS (`rediss://` with
//! `coordination.redis_ca` and `redis_password_env`). tests/coordination.rs covers the contract
//! itself against one plain server.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{ConnectReturnCode, QoS};
use support::pki::TestPki;
use support::{
    mon, poll_until, sha256_token, standard_policy, v4, Broker, ProxyProcess, Redis, RedisCluster,
    Warden, WAIT,
};

/// A subscriber of the proxy's statuses, directly on the broker.
async fn broker_watcher(broker: &Broker, client_id: &str, filter: &str) -> v4::Client {
    let addr: SocketAddr = broker.addr().parse().unwrap();
    let mut watcher = v4::connect(addr, client_id, None, None).await.unwrap();
    watcher.subscribe(filter, QoS::AtMostOnce).await;
    watcher
}

/// The next non-empty status on `topic` within `limit`.
async fn next_status(watcher: &mut v4::Client, topic: &str, limit: Duration) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let publish = watcher
            .next_publish_within(left)
            .await
            .unwrap_or_else(|| panic!("no status on {topic} within {limit:?}"));
        if publish.topic == topic && !publish.payload.is_empty() {
            return mon::parse(&publish.payload);
        }
    }
}

/// The standard policy, and an org `small` of at most two connections.
fn policy() -> String {
    format!(
        "{}  small:\n    limits: {{ max_connections: 2 }}\n    device_types: {{ sensor: {{}} }}\n    devices:\n      sensor/a: {{ token: \"{t}\" }}\n      sensor/b: {{ token: \"{t}\" }}\n      sensor/c: {{ token: \"{t}\" }}\n",
        standard_policy(),
        t = sha256_token("t"),
    )
}

async fn small_device(addr: SocketAddr, device: &str) -> Result<v4::Client, v4::Refused> {
    v4::connect(
        addr,
        &format!("d:small:sensor:{device}"),
        Some("use-token-auth"),
        Some("t"),
    )
    .await
}

/// A takes dev1 over from B's instance: B's Disconnect (288) comes before A's Connect, and B
/// answered the request itself (nothing settled on its behalf).
async fn check_takeover(broker: &Broker, a: SocketAddr, b: &Warden) {
    let topic = "org1/iot-2/type/sensor/id/dev1/mon";
    let mut watcher = broker_watcher(broker, "takeover-watcher", topic).await;
    let mut first = v4::org1_device(a, "dev1").await;
    assert_eq!(
        next_status(&mut watcher, topic, WAIT).await["Action"],
        "Connect"
    );
    let _second = v4::org1_device(b.addr, "dev1").await;
    first.closed().await;
    let old = next_status(&mut watcher, topic, WAIT).await;
    assert_eq!(
        (old["Action"].as_str(), old["CloseCode"].as_i64()),
        (Some("Disconnect"), Some(288))
    );
    let new = next_status(&mut watcher, topic, WAIT).await;
    assert_eq!(new["Action"], "Connect");
    assert!(new["Epoch"].as_u64() > old["Epoch"].as_u64(), "{old} {new}");
    let coordination = &b.running.metrics.coordination;
    assert_eq!(coordination.remote_takeovers.get(), 1);
    assert_eq!(coordination.settled.get(), 0);
}

#[tokio::test]
async fn a_redis_cluster_carries_takeovers_the_org_quota_and_a_crash_settlement() {
    let broker = Broker::start().await;
    let cluster = RedisCluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), policy()).unwrap();
    // Instance a is a process of its own (to be killed), b runs here; each lists the seed
    // nodes from a different one, so their channels are on different nodes of the cluster.
    // b's first seed answers nothing, and its second is a node without slots, which b
    // subscribes on, and which goes away later.
    let config = format!(
        "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  address: \"{}\"\npolicies: policy.yaml\ntelemetry: {{ log_format: json }}\n{}",
        broker.addr(),
        cluster.coordination("a", 0, &[])
    );
    let mut a = ProxyProcess::start(dir.path(), "a", &config, &[]).await;
    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_seed = format!("redis://{}", nobody.local_addr().unwrap());
    drop(nobody);
    let empty = cluster.add_empty_node().await;
    let b_seeds = [dead_seed, empty.url()];
    let b = Warden::start_with(&broker, &policy(), &cluster.coordination("b", 1, &b_seeds)).await;

    check_takeover(&broker, a.addr, &b).await;

    // b's pub/sub node stops: b subscribes again on its next seed node, and still hears a
    // takeover request (it closes its own session, well before a would settle it).
    assert_eq!(
        cluster.subscribers("warden:chan:b").await,
        0,
        "b is on the extra node"
    );
    empty.stop().await;
    poll_until(WAIT, "b subscribes on another node", || async {
        (cluster.subscribers("warden:chan:b").await == 1).then_some(())
    })
    .await;
    let dev2 = "org1/iot-2/type/sensor/id/dev2/mon";
    let mut dev2_watcher = broker_watcher(&broker, "dev2-watcher", dev2).await;
    let mut dev2_on_b = v4::org1_device(b.addr, "dev2").await;
    let connect = next_status(&mut dev2_watcher, dev2, WAIT).await;
    assert_eq!(connect["Action"], "Connect");
    let _dev2_on_a = v4::org1_device(a.addr, "dev2").await;
    tokio::time::timeout(Duration::from_secs(4), dev2_on_b.closed())
        .await
        .expect("b closes its session itself");
    let old = next_status(&mut dev2_watcher, dev2, WAIT).await;
    assert_eq!(
        (old["Action"].as_str(), old["CloseCode"].as_i64()),
        (Some("Disconnect"), Some(288))
    );
    let connect = next_status(&mut dev2_watcher, dev2, WAIT).await;
    assert_eq!(connect["Action"], "Connect");

    // The org quota is exact across the instances.
    let small_a = "small/iot-2/type/sensor/id/a/mon";
    let mut small_watcher = broker_watcher(&broker, "small-watcher", small_a).await;
    let _small_a_on_a = small_device(a.addr, "a").await.unwrap();
    let connect = next_status(&mut small_watcher, small_a, WAIT).await;
    assert_eq!(connect["Action"], "Connect");
    let _small_b_on_b = small_device(b.addr, "b").await.unwrap();
    let refused = Some(v4::Refused::Code(ConnectReturnCode::ServiceUnavailable));
    assert_eq!(small_device(a.addr, "c").await.err(), refused);
    assert_eq!(small_device(b.addr, "c").await.err(), refused);

    // kill -9 of a: once its lease runs out, b publishes the Disconnect of a's clients (dev2
    // and small/a) and gives small/a's place back.
    a.child.kill().await.unwrap();
    let killed = tokio::time::Instant::now();
    for (watcher, topic) in [(&mut small_watcher, small_a), (&mut dev2_watcher, dev2)] {
        let settled = next_status(watcher, topic, Duration::from_secs(20)).await;
        assert_eq!(
            (settled["Action"].as_str(), settled["CloseCode"].as_i64()),
            (Some("Disconnect"), Some(92)),
            "{topic}"
        );
    }
    assert!(
        killed.elapsed() >= Duration::from_secs(5),
        "settled while a's lease ran"
    );
    assert_eq!(b.running.metrics.coordination.settled.get(), 2);
    let _c = small_device(b.addr, "c").await.unwrap();
    assert_eq!(b.running.metrics.coordination.up.get(), 1);
}

const TLS_PASSWORD_VAR: &str = "WARDEN_TEST_TLS_REDIS_PASSWORD";
const TLS_PASSWORD: &str = "tls-redis-secret";

/// The `coordination:` section for a TLS-only Redis, its password from the environment.
fn tls_coordination(redis: &Redis, ca: Option<&std::path::Path>, instance: &str) -> String {
    let ca = ca
        .map(|ca| format!("  redis_ca: \"{}\"\n", ca.display()))
        .unwrap_or_default();
    format!(
        "coordination:\n  redis: \"{}\"\n{ca}  redis_password_env: {TLS_PASSWORD_VAR}\n  instance_id: {instance}\n",
        redis.url()
    )
}

#[tokio::test]
async fn coordination_over_tls_trusts_the_configured_ca_and_takes_the_password_from_the_environment(
) {
    let pki = TestPki::new("redis");
    std::env::set_var(TLS_PASSWORD_VAR, TLS_PASSWORD);
    let broker = Broker::start().await;
    let redis = Redis::start_tls(&pki, TLS_PASSWORD).await;
    assert!(redis.url().starts_with("rediss://"));
    let ca = Some(pki.ca_path.as_path());
    let a = Warden::start_with(
        &broker,
        &standard_policy(),
        &tls_coordination(&redis, ca, "a"),
    )
    .await;
    let b = Warden::start_with(
        &broker,
        &standard_policy(),
        &tls_coordination(&redis, ca, "b"),
    )
    .await;
    check_takeover(&broker, a.addr, &b).await;

    // Without the CA, the system's trust store does not know the server's certificate: the
    // proxy does not start.
    let text = format!(
        "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  address: \"{}\"\npolicies: policy.yaml\n{}",
        broker.addr(),
        tls_coordination(&redis, None, "c")
    );
    let path = a.dir.path().join("untrusting.yaml");
    let config = mqtt_warden::config::WardenConfig::from_yaml(&text, &path).unwrap();
    let started = tokio::time::timeout(Duration::from_secs(20), mqtt_warden::proxy::start(config))
        .await
        .expect("the start gives up in time");
    let error = started.err().expect("no start without the CA").to_string();
    assert!(error.contains("coordination"), "{error}");
}
