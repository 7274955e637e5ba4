//! Several proxy instances in front of one broker, sharing state in a private `redis-server`:
//! takeover across instances (288, and the old Disconnect before the new Connect, as a subscriber
//! on the broker sees them), the org connection quota (173) across instances, application status
//! cleared only by the app's last connection anywhere, and crash settlement after `kill -9`.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{ConnectReturnCode, QoS};
use support::{
    mon, poll_until, sha256_token, standard_policy, v4, Broker, ProxyProcess, Redis, Warden, WAIT,
};

/// A subscriber of the proxy's own statuses, directly on the broker (org1's prefix).
async fn broker_watcher(broker: &Broker, filter: &str) -> v4::Client {
    broker_watcher_named(broker, "status-watcher", filter).await
}

/// The next status on `topic` (retained or not), skipping other topics and empty clearings.
async fn next_status(watcher: &mut v4::Client, topic: &str) -> serde_json::Value {
    next_status_within(watcher, topic, WAIT).await
}

async fn next_status_within(
    watcher: &mut v4::Client,
    topic: &str,
    limit: Duration,
) -> serde_json::Value {
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

async fn instance(broker: &Broker, redis: &Redis, policy: &str, name: &str) -> Warden {
    Warden::start_with(broker, policy, &redis.coordination(name)).await
}

/// A broker, a Redis, and instances `a` and `b` in front of them with `policy`.
async fn two_instances(policy: &str) -> (Broker, Redis, Warden, Warden) {
    let broker = Broker::start().await;
    let redis = Redis::start().await;
    let a = instance(&broker, &redis, policy, "a").await;
    let b = instance(&broker, &redis, policy, "b").await;
    (broker, redis, a, b)
}

#[tokio::test]
async fn takeover_through_another_instance_closes_the_old_session_with_288_first() {
    let (broker, _redis, a, b) = two_instances(&standard_policy()).await;
    let topic = "org1/iot-2/type/sensor/id/dev1/mon";
    let mut watcher = broker_watcher(&broker, topic).await;

    let mut first = v4::org1_device(a.addr, "dev1").await;
    let connect = next_status(&mut watcher, topic).await;
    assert_eq!(connect["Action"], "Connect");
    let _second = v4::org1_device(b.addr, "dev1").await;
    first.closed().await;

    let old = next_status(&mut watcher, topic).await;
    assert_eq!(old["Action"], "Disconnect");
    assert_eq!(old["CloseCode"], 288);
    let new = next_status(&mut watcher, topic).await;
    assert_eq!(new["Action"], "Connect");
    assert_eq!(a.running.admission.sessions().len(), 0);
    assert_eq!(b.running.admission.sessions().len(), 1);
    // a closed its own session and answered: b settled nothing on a's behalf.
    let coordination = &b.running.metrics.coordination;
    assert_eq!(coordination.remote_takeovers.get(), 1);
    assert_eq!(coordination.settled.get(), 0);
    assert_eq!(coordination.up.get(), 1);
}

#[tokio::test]
async fn alternating_takeovers_keep_every_status_pair_in_order() {
    let (broker, _redis, a, b) = two_instances(&standard_policy()).await;
    let topic = "org1/iot-2/type/sensor/id/dev2/mon";
    let mut watcher = broker_watcher(&broker, topic).await;

    const ROUNDS: usize = 20;
    let mut previous: Option<v4::Client> = None;
    for round in 0..ROUNDS {
        let through = if round % 2 == 0 { a.addr } else { b.addr };
        // The next client connects without waiting for the last one to be closed.
        let client = v4::org1_device(through, "dev2").await;
        if let Some(mut old) = previous.replace(client) {
            old.closed().await;
        }
        let live = a.running.admission.sessions().len() + b.running.admission.sessions().len();
        assert_eq!(live, 1, "round {round}: one live session for the client ID");
    }
    previous.unwrap().disconnect().await;

    // Connect, Disconnect 288, Connect, ... and the last Disconnect: never two of a kind in a row.
    let mut seen = Vec::new();
    let mut seen_sequence = Vec::new();
    while seen.len() < 2 * ROUNDS {
        let status = next_status(&mut watcher, topic).await;
        seen_sequence.push(status["Sequence"].as_u64().expect("a sequence"));
        assert_eq!(
            status["Epoch"].as_u64(),
            Some(seen_sequence.last().unwrap().div_ceil(2))
        );
        seen.push((
            status["Action"].as_str().unwrap().to_owned(),
            status["CloseCode"].as_i64(),
        ));
    }
    // Each status carries the client ID's epoch and a sequence that counts up by one.
    let first = seen_sequence[0];
    for (index, sequence) in seen_sequence.iter().enumerate() {
        assert_eq!(
            *sequence,
            first + index as u64,
            "sequences {seen_sequence:?}"
        );
    }
    for (index, (action, code)) in seen.iter().enumerate() {
        let expected = if index % 2 == 0 {
            "Connect"
        } else {
            "Disconnect"
        };
        assert_eq!(action, expected, "status {index} out of order: {seen:?}");
        if index % 2 == 1 && index + 1 < seen.len() {
            assert_eq!(*code, Some(288), "status {index}: {seen:?}");
        }
    }
}

fn small_org_policy() -> String {
    format!(
        "orgs:\n  small:\n    limits: {{ max_connections: 2 }}\n    device_types: {{ sensor: {{}} }}\n    devices:\n      sensor/a: {{ token: \"{t}\" }}\n      sensor/b: {{ token: \"{t}\" }}\n      sensor/c: {{ token: \"{t}\" }}\n",
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

#[tokio::test]
async fn the_org_connection_quota_counts_every_instance_and_a_takeover_once() {
    let (_broker, _redis, a, b) = two_instances(&small_org_policy()).await;

    let mut device_a = small_device(a.addr, "a").await.unwrap();
    let device_b = small_device(b.addr, "b").await.unwrap();
    let refused = Some(v4::Refused::Code(ConnectReturnCode::ServiceUnavailable));
    assert_eq!(small_device(a.addr, "c").await.err(), refused);
    assert_eq!(small_device(b.addr, "c").await.err(), refused);

    // Device a moves to instance b: a takeover keeps its one place.
    let _device_a_again = small_device(b.addr, "a").await.unwrap();
    device_a.closed().await;
    assert_eq!(small_device(a.addr, "c").await.err(), refused);

    // A place given back on one instance is free on the other.
    device_b.disconnect().await;
    let refused = &refused;
    poll_until(WAIT, "b's place comes back", || async move {
        match small_device(a.addr, "c").await {
            Ok(client) => Some(client),
            Err(refusal) => {
                assert_eq!(Some(refusal), *refused);
                None
            }
        }
    })
    .await;
}

#[tokio::test]
async fn an_app_status_is_cleared_only_by_its_last_connection_on_any_instance() {
    let (broker, _redis, a, b) = two_instances(&standard_policy()).await;
    let topic = "org1/iot-2/app/pool/mon";
    let mut watcher = broker_watcher(&broker, topic).await;

    // A load-balanced application: one client ID, a connection on each instance.
    let on_a = v4::org1_app(a.addr, "A:org1:pool:one").await;
    assert_eq!(next_status(&mut watcher, topic).await["Action"], "Connect");
    let on_b = v4::org1_app(b.addr, "A:org1:pool:one").await;
    assert_eq!(next_status(&mut watcher, topic).await["Action"], "Connect");

    on_a.disconnect().await;
    assert_eq!(
        next_status(&mut watcher, topic).await["Action"],
        "Disconnect"
    );
    // The app is still connected through b: its retained status stays.
    let mut late = broker_watcher_named(&broker, "late-1", topic).await;
    let retained = late.next_publish().await;
    assert!(retained.retain);
    assert_eq!(mon::parse(&retained.payload)["Action"], "Connect");

    on_b.disconnect().await;
    assert_eq!(
        next_status(&mut watcher, topic).await["Action"],
        "Disconnect"
    );
    // The last connection is gone: nothing retained is left.
    let mut later = broker_watcher_named(&broker, "late-2", topic).await;
    later.subscribe("sentinel/late-2", QoS::AtMostOnce).await;
    later
        .client
        .publish("sentinel/late-2", QoS::AtMostOnce, false, "end")
        .await
        .unwrap();
    let first = later.next_publish().await;
    assert_eq!(
        first.topic, "sentinel/late-2",
        "no retained status for the app"
    );
}

async fn broker_watcher_named(broker: &Broker, client_id: &str, filter: &str) -> v4::Client {
    let addr: SocketAddr = broker.addr().parse().unwrap();
    let mut watcher = v4::connect(addr, client_id, None, None).await.unwrap();
    watcher.subscribe(filter, QoS::AtMostOnce).await;
    watcher
}

/// An instance as a process of the real binary, so that it can be killed with SIGKILL.
async fn instance_process(
    dir: &std::path::Path,
    broker: &Broker,
    redis: &Redis,
    name: &str,
) -> ProxyProcess {
    let config = format!(
        "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  address: \"{}\"\npolicies: policy.yaml\ntelemetry: {{ log_format: json }}\n{}",
        broker.addr(),
        redis.coordination(name)
    );
    ProxyProcess::start(dir, name, &config, &[]).await
}

#[tokio::test]
async fn a_takeover_from_a_killed_instance_publishes_its_288_at_once() {
    let broker = Broker::start().await;
    let redis = Redis::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), standard_policy()).unwrap();
    let mut a = instance_process(dir.path(), &broker, &redis, "a").await;
    let b = instance(&broker, &redis, &standard_policy(), "b").await;
    let topic = "org1/iot-2/type/sensor/id/dev1/mon";
    let mut watcher = broker_watcher(&broker, topic).await;

    let _on_a = v4::org1_device(a.addr, "dev1").await;
    assert_eq!(next_status(&mut watcher, topic).await["Action"], "Connect");
    a.child.kill().await.unwrap();

    // a's lease still runs, but nothing listens for it: b settles a's session (288) first,
    // without waiting for the lease to run out.
    let started = tokio::time::Instant::now();
    let _on_b = v4::org1_device(b.addr, "dev1").await;
    let old = next_status(&mut watcher, topic).await;
    assert_eq!(
        (old["Action"].as_str(), old["CloseCode"].as_i64()),
        (Some("Disconnect"), Some(288))
    );
    assert_eq!(next_status(&mut watcher, topic).await["Action"], "Connect");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(b.running.metrics.coordination.settled.get(), 1);
}

#[tokio::test]
async fn the_survivors_settle_a_killed_instance_and_free_its_quota() {
    let broker = Broker::start().await;
    let redis = Redis::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policy = small_org_policy().replace("max_connections: 2", "max_connections: 1");
    std::fs::write(dir.path().join("policy.yaml"), &policy).unwrap();
    let mut a = instance_process(dir.path(), &broker, &redis, "a").await;
    let b = instance(&broker, &redis, &policy, "b").await;
    let topic = "small/iot-2/type/sensor/id/a/mon";
    let mut watcher = broker_watcher(&broker, topic).await;

    let _on_a = small_device(a.addr, "a").await.unwrap();
    assert_eq!(next_status(&mut watcher, topic).await["Action"], "Connect");
    let refused = Some(v4::Refused::Code(ConnectReturnCode::ServiceUnavailable));
    assert_eq!(small_device(b.addr, "b").await.err(), refused);
    a.child.kill().await.unwrap();
    let killed = tokio::time::Instant::now();

    // Within the lease (10 s) and a renewal round (2 s) or two, b publishes a's Disconnect...
    let settled = next_status_within(&mut watcher, topic, Duration::from_secs(20)).await;
    assert_eq!(settled["Action"], "Disconnect");
    assert_eq!(settled["CloseCode"], 92);
    assert!(
        killed.elapsed() >= Duration::from_secs(5),
        "settled while a's lease ran"
    );
    assert_eq!(b.running.metrics.coordination.settled.get(), 1);
    // ... and the org's place is free again.
    let _on_b = small_device(b.addr, "b").await.unwrap();
}

#[tokio::test]
async fn without_redis_an_instance_fails_closed_and_recovers_by_itself() {
    let broker = Broker::start().await;
    let redis = Redis::start().await;
    let port = redis.port;
    let a = instance(&broker, &redis, &standard_policy(), "a").await;
    let coordinator = a.running.coordinator.clone().expect("coordinated");
    let topic = "org1/iot-2/type/sensor/id/dev1/mon";
    let mut watcher = broker_watcher(&broker, topic).await;
    let mut dev1 = v4::org1_device(a.addr, "dev1").await;
    assert_eq!(next_status(&mut watcher, topic).await["Action"], "Connect");

    redis.stop().await;
    let stopped = tokio::time::Instant::now();
    // New clients are refused (167: CONNACK 3) while ownership and quotas cannot be checked.
    let refused = v4::connect(
        a.addr,
        "d:org1:sensor:dev2",
        Some("use-token-auth"),
        Some("dev2-token"),
    )
    .await
    .err();
    assert_eq!(
        refused,
        Some(v4::Refused::Code(ConnectReturnCode::ServiceUnavailable))
    );
    // The held client is closed before the lease could run out elsewhere, and its Disconnect
    // still reaches the broker.
    dev1.closed().await;
    let closed_after = stopped.elapsed();
    assert!(closed_after < Duration::from_secs(9), "{closed_after:?}");
    let disconnect = next_status(&mut watcher, topic).await;
    assert_eq!(disconnect["Action"], "Disconnect");
    assert_eq!(disconnect["CloseCode"], 92);
    assert!(!coordinator.is_healthy());
    assert_eq!(a.running.metrics.coordination.up.get(), 0);

    // Redis comes back (empty: no persistence); the instance takes its lease again.
    let _redis = Redis::start_on(port)
        .await
        .expect("redis restarts on its port");
    poll_until(Duration::from_secs(15), "healthy again", || async {
        coordinator.is_healthy().then_some(())
    })
    .await;
    let _dev1 = v4::org1_device(a.addr, "dev1").await;
    assert_eq!(next_status(&mut watcher, topic).await["Action"], "Connect");
}

/// Redis restarts (empty: no persistence) while a device publishes at QoS 1 through one
/// instance: every PUBLISH the device saw acknowledged reaches the broker, the instances close
/// what they can no longer vouch for with a Disconnect status, and traffic resumes through the
/// other instance once Redis is back.
#[tokio::test]
async fn a_redis_restart_under_traffic_loses_no_acknowledged_message() {
    let (broker, redis, a, b) = two_instances(&standard_policy()).await;
    let port = redis.port;
    let events = "org1/iot-2/type/sensor/id/dev1/evt/+/fmt/+";
    let status = "org1/iot-2/type/sensor/id/dev1/mon";
    let addr: SocketAddr = broker.addr().parse().unwrap();
    let mut received = v4::connect(addr, "event-watcher", None, None)
        .await
        .unwrap();
    received.subscribe(events, QoS::AtLeastOnce).await;
    let mut watcher = broker_watcher(&broker, status).await;
    let mut dev1 = v4::org1_device(a.addr, "dev1").await;
    assert_eq!(next_status(&mut watcher, status).await["Action"], "Connect");

    let topic = "iot-2/evt/seq/fmt/txt";
    let mut acked: Vec<u32> = Vec::new();
    let mut n = 0u32;
    // Traffic before the restart.
    while n < 20 {
        assert!(dev1.publish_acked(topic, n.to_string().into_bytes()).await);
        acked.push(n);
        n += 1;
    }
    // The restart, while the device keeps publishing one message at a time.
    let publishing = tokio::spawn(async move {
        let (mut acked_during, mut n) = (Vec::new(), n);
        while dev1.publish_acked(topic, n.to_string().into_bytes()).await {
            acked_during.push(n);
            n += 1;
        }
        (acked_during, n)
    });
    redis.stop().await;
    let _redis = Redis::start_on(port)
        .await
        .expect("redis restarts on its port");
    let (acked_during, next) = tokio::time::timeout(Duration::from_secs(30), publishing)
        .await
        .expect("the instance closes the device it can no longer vouch for")
        .expect("publisher task");
    acked.extend(acked_during);
    n = next + 1;
    let disconnect = next_status(&mut watcher, status).await;
    assert_eq!(disconnect["Action"], "Disconnect");

    // Redis is back: the device reconnects through the other instance and publishes again.
    let mut dev1 = poll_until(Duration::from_secs(20), "admitted again", || async {
        v4::connect(
            b.addr,
            "d:org1:sensor:dev1",
            Some("use-token-auth"),
            Some("dev1-token"),
        )
        .await
        .ok()
    })
    .await;
    assert_eq!(next_status(&mut watcher, status).await["Action"], "Connect");
    for _ in 0..20 {
        assert!(dev1.publish_acked(topic, n.to_string().into_bytes()).await);
        acked.push(n);
        n += 1;
    }

    // Every acknowledged message is at the broker (others may be there too: at least once).
    let mut seen = std::collections::HashSet::new();
    let last = *acked.last().expect("messages were acknowledged");
    while !seen.contains(&last) {
        let publish = received.next_publish().await;
        let value: u32 = std::str::from_utf8(&publish.payload)
            .unwrap()
            .parse()
            .unwrap();
        seen.insert(value);
    }
    let lost: Vec<u32> = acked
        .iter()
        .filter(|n| !seen.contains(n))
        .copied()
        .collect();
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
}

#[tokio::test]
async fn when_redis_loses_its_data_only_the_clients_it_held_are_closed() {
    let (broker, redis, _a, b) = two_instances(&standard_policy()).await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let dev1 = "org1/iot-2/type/sensor/id/dev1/mon";
    let mut watcher = broker_watcher(&broker, dev1).await;
    let mut before = v4::org1_device(b.addr, "dev1").await;
    assert_eq!(next_status(&mut watcher, dev1).await["Action"], "Connect");

    // Redis loses its data (as a restart without persistence does), and dev2 connects through
    // b before b's next renewal notices: dev2's claim is in the new data.
    let mut after = None;
    for _ in 0..3 {
        let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
        let client = v4::org1_device(b.addr, "dev2").await;
        let noticed: bool = redis::cmd("EXISTS")
            .arg("warden:mark:{b}")
            .query_async(&mut conn)
            .await
            .unwrap();
        if !noticed {
            after = Some(client);
            break;
        }
        // b renewed in between: try again, in the next renewal period.
        client.disconnect().await;
    }
    let mut after = after.expect("dev2 claimed between the loss and b's next renewal");

    // b's renewal notices: dev1, whose record was lost, is closed (92) and its Disconnect
    // published by b; dev2 goes on.
    before.closed().await;
    let lost = next_status(&mut watcher, dev1).await;
    assert_eq!(
        (lost["Action"].as_str(), lost["CloseCode"].as_i64()),
        (Some("Disconnect"), Some(92))
    );
    assert!(
        after
            .publish_acked("iot-2/evt/e/fmt/txt", b"still here".to_vec())
            .await
    );
    assert_eq!(b.running.admission.sessions().len(), 1);
}

#[tokio::test]
async fn a_redis_stall_closes_the_clients_and_gives_their_places_back_afterwards() {
    let broker = Broker::start().await;
    let redis = Redis::start().await;
    let policy = small_org_policy().replace("max_connections: 2", "max_connections: 1");
    let a = instance(&broker, &redis, &policy, "a").await;
    let mut device_a = small_device(a.addr, "a").await.unwrap();

    // Redis answers nothing for 7 s: longer than an instance may go without renewing its lease.
    let mut control = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(7000)
        .arg("ALL")
        .query_async(&mut control)
        .await
        .unwrap();
    let paused = tokio::time::Instant::now();
    device_a.closed().await;
    assert!(
        paused.elapsed() < Duration::from_secs(7),
        "{:?}",
        paused.elapsed()
    );

    // Once Redis answers again, the closed client's org place is given back.
    let refused = &Some(v4::Refused::Code(ConnectReturnCode::ServiceUnavailable));
    poll_until(
        Duration::from_secs(20),
        "the place comes back",
        || async move {
            match small_device(a.addr, "b").await {
                Ok(client) => Some(client),
                Err(refusal) => {
                    assert_eq!(Some(refusal), *refused);
                    None
                }
            }
        },
    )
    .await;
}

#[tokio::test]
async fn the_org_publish_rate_is_shared_by_the_instances() {
    let policy = standard_policy().replacen(
        "limits: { publish_rate:",
        "limits: { org_publish_rate: \"20/s\", publish_rate:",
        1,
    );
    assert!(policy.contains("org_publish_rate"));
    let (broker, _redis, a, b) = two_instances(&policy).await;
    let mut watcher = broker_watcher(&broker, "org1/iot-2/type/sensor/id/+/evt/+/fmt/+").await;

    // A device on each instance publishes far faster than the org may.
    let mut publishers = Vec::new();
    for (addr, device) in [(a.addr, "dev1"), (b.addr, "dev2")] {
        let client = v4::org1_device(addr, device).await;
        publishers.push(tokio::spawn(async move {
            for _ in 0..500 {
                if client
                    .client
                    .publish("iot-2/evt/e/fmt/txt", QoS::AtMostOnce, false, "x")
                    .await
                    .is_err()
                {
                    break;
                }
            }
            client
        }));
    }
    // Counted over 3 s from the first delivery: the org's 20/s, its burst of one period (20),
    // and at most one batch (1 token at 20/s) per instance beyond.
    watcher.next_publish().await;
    let window = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut delivered = 1;
    while let Some(left) = window.checked_duration_since(tokio::time::Instant::now()) {
        match watcher.next_publish_within(left).await {
            Some(_) => delivered += 1,
            None => break,
        }
    }
    let limit = 20 * 3 + 20 + 2;
    assert!(
        delivered <= limit + 4,
        "{delivered} delivered in 3 s, the org allows about {limit}"
    );
    assert!(delivered >= 60, "only {delivered} delivered in 3 s");
    eprintln!("delivered {delivered} in 3 s (the org allows about {limit})");
    for publisher in publishers {
        publisher.abort();
    }
}

#[tokio::test]
async fn a_shutdown_publishes_its_disconnects_and_gives_the_lease_back() {
    let broker = Broker::start().await;
    let redis = Redis::start().await;
    let a = instance(&broker, &redis, &standard_policy(), "a").await;
    let topic = "org1/iot-2/type/sensor/id/dev1/mon";
    let mut watcher = broker_watcher(&broker, topic).await;
    let mut dev1 = v4::org1_device(a.addr, "dev1").await;
    assert_eq!(next_status(&mut watcher, topic).await["Action"], "Connect");

    a.running.shutdown(Duration::from_secs(5)).await;
    dev1.closed().await;
    let disconnect = next_status(&mut watcher, topic).await;
    assert_eq!(disconnect["CloseCode"], 93);
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let lease: bool = redis::cmd("EXISTS")
        .arg("warden:lease:{a}")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!lease, "the lease is given back");
    let instances: Vec<String> = redis::cmd("SMEMBERS")
        .arg("warden:instances")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(instances.is_empty(), "{instances:?}");
    let count: Option<i64> = redis::cmd("GET")
        .arg("warden:{o:org1}:count")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(count, None, "no connection of org1 is counted");
}

#[tokio::test]
async fn when_every_instance_died_the_first_to_start_settles_their_clients() {
    let broker = Broker::start().await;
    let redis = Redis::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), standard_policy()).unwrap();
    let mut a = instance_process(dir.path(), &broker, &redis, "a").await;
    let topic = "org1/iot-2/type/sensor/id/dev1/mon";
    let mut watcher = broker_watcher(&broker, topic).await;
    let _on_a = v4::org1_device(a.addr, "dev1").await;
    assert_eq!(next_status(&mut watcher, topic).await["Action"], "Connect");
    a.child.kill().await.unwrap();

    // The only instance is gone. Its successor under the same instance ID waits for the old
    // lease to run out, then settles what the old process left before it takes clients.
    let restarted = instance(&broker, &redis, &standard_policy(), "a").await;
    let settled = next_status(&mut watcher, topic).await;
    assert_eq!(settled["Action"], "Disconnect");
    assert_eq!(settled["CloseCode"], 92);
    assert_eq!(
        settled["Reason"],
        "The connection was closed by the server: settled after a proxy restart"
    );
    let _again = v4::org1_device(restarted.addr, "dev1").await;
    assert_eq!(next_status(&mut watcher, topic).await["Action"], "Connect");
}

/// The raw owner record of a client ID in Redis: its epoch and the sessions holding it.
async fn owner_record(redis: &Redis, org: &str, client_id: &str) -> (u64, usize) {
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let record: Vec<u8> = redis::cmd("HGET")
        .arg(format!("warden:{{o:{org}}}:owner"))
        .arg(client_id)
        .query_async(&mut conn)
        .await
        .unwrap();
    let fields: Vec<&[u8]> = record.split(|b| *b == 0).collect();
    let epoch = std::str::from_utf8(fields[0]).unwrap().parse().unwrap();
    (epoch, (fields.len() - 1) / 2)
}

#[tokio::test]
async fn a_client_ids_epoch_only_goes_up() {
    let (broker, redis, a, b) = two_instances(&standard_policy()).await;
    let topic = "org1/iot-2/type/sensor/id/dev1/mon";
    let mut watcher = broker_watcher(&broker, topic).await;
    let mut last = 0;
    let mut held = None;
    for round in 0..4 {
        let through = if round % 2 == 0 { a.addr } else { b.addr };
        let client = v4::org1_device(through, "dev1").await;
        if let Some(mut old) = held.replace(client) {
            old.closed().await;
        }
        let (epoch, _) = owner_record(&redis, "org1", "d:org1:sensor:dev1").await;
        assert_eq!(epoch, last + 1, "round {round}");
        last = epoch;
    }
    held.unwrap().disconnect().await;
    // The release keeps the epoch and leaves no holder.
    loop {
        let status = next_status(&mut watcher, topic).await;
        if status["Action"] == "Disconnect" && status["CloseCode"] == 0 {
            break;
        }
    }
    poll_until(WAIT, "the holder goes", || async {
        let (epoch, holders) = owner_record(&redis, "org1", "d:org1:sensor:dev1").await;
        assert_eq!(epoch, last);
        (holders == 0).then_some(())
    })
    .await;
    let _again = v4::org1_device(a.addr, "dev1").await;
    assert_eq!(
        owner_record(&redis, "org1", "d:org1:sensor:dev1").await.0,
        last + 1
    );
}

#[tokio::test]
async fn a_holder_that_cannot_hear_is_settled_for_and_its_late_disconnect_is_fenced() {
    let (broker, redis, a, b) = two_instances(&standard_policy()).await;
    let topic = "org1/iot-2/type/sensor/id/dev1/mon";
    let mut watcher = broker_watcher(&broker, topic).await;
    let mut on_a = v4::org1_device(a.addr, "dev1").await;
    assert_eq!(next_status(&mut watcher, topic).await["Action"], "Connect");

    // a's channel subscription is cut (and cut again whenever it comes back) while b takes the
    // client over: a never hears the request, so b settles a's session itself.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // a subscribed first, so its connection has the lower ID.
    let b_subscriber = *pubsub_clients(&mut conn)
        .await
        .iter()
        .max()
        .expect("two subscribers");
    let (first_cut, cut) = tokio::sync::oneshot::channel();
    let mut first_cut = Some(first_cut);
    let cutter = tokio::spawn(async move {
        loop {
            for id in pubsub_clients(&mut conn)
                .await
                .into_iter()
                .filter(|id| *id != b_subscriber)
            {
                let _: Result<(), _> = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("ID")
                    .arg(id)
                    .query_async(&mut conn)
                    .await;
            }
            if let Some(first_cut) = first_cut.take() {
                let _ = first_cut.send(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await; // sleep-ok: the pace of an adversary that keeps cutting a's channel, not a wait
        }
    });
    cut.await.expect("a's channel is cut");
    let _on_b = v4::org1_device(b.addr, "dev1").await;
    on_a.closed().await;
    cutter.abort();

    let old = next_status(&mut watcher, topic).await;
    assert_eq!(
        (old["Action"].as_str(), old["CloseCode"].as_i64()),
        (Some("Disconnect"), Some(288))
    );
    assert_eq!(next_status(&mut watcher, topic).await["Action"], "Connect");
    assert_eq!(b.running.metrics.coordination.settled.get(), 1);
    // a's own Disconnect, when its session ends, finds its record gone and is not published.
    let late = watcher.next_publish_within(Duration::from_secs(3)).await;
    assert!(late.is_none(), "a zombie's status got through: {late:?}");
}

/// The IDs of Redis's pub/sub connections (the instances' channel subscriptions).
async fn pubsub_clients(conn: &mut redis::aio::MultiplexedConnection) -> Vec<u64> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(conn)
        .await
        .unwrap();
    list.lines()
        .filter_map(|line| line.strip_prefix("id="))
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect()
}

const ADMIN_TOKEN: &str = "admin-token-0123456789";

/// The `admin:` section with the session endpoints behind [`ADMIN_TOKEN`].
fn admin_section() -> String {
    std::env::set_var("WARDEN_TEST_COORDINATION_ADMIN_TOKEN", ADMIN_TOKEN);
    "admin: { bind: \"127.0.0.1:0\", token_env: WARDEN_TEST_COORDINATION_ADMIN_TOKEN }\n".into()
}

/// One request to an admin endpoint: its status code and JSON body.
async fn admin(
    warden: &Warden,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = warden.running.admin_addr.expect("admin endpoint");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let authorization = token
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    let request = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{authorization}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    (status, serde_json::from_str(body).unwrap_or_default())
}

#[tokio::test]
async fn an_administrator_lists_and_closes_an_orgs_sessions_on_every_instance() {
    let broker = Broker::start().await;
    let redis = Redis::start().await;
    let start = |name: &'static str| {
        let config = format!("{}{}", redis.coordination(name), admin_section());
        let (broker, policy) = (&broker, standard_policy());
        async move { Warden::start_with(broker, &policy, &config).await }
    };
    let (a, b) = (start("a").await, start("b").await);
    let mut watcher = broker_watcher(&broker, "org1/iot-2/type/sensor/id/+/mon").await;
    let mut dev1 = v4::org1_device(a.addr, "dev1").await;
    let mut dev2 = v4::org1_device(b.addr, "dev2").await;

    let path = "/admin/orgs/org1/sessions";
    assert_eq!(admin(&a, "GET", path, None).await.0, 401);
    assert_eq!(
        admin(&a, "GET", path, Some("wrong-token-0123456789"))
            .await
            .0,
        401
    );
    let (status, listed) = admin(&a, "GET", path, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{listed}");
    let mut held: Vec<(String, String)> = listed["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["client_id"].as_str().unwrap().to_owned(),
                s["instance"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    held.sort();
    assert_eq!(
        held,
        [
            ("d:org1:sensor:dev1".to_owned(), "a".to_owned()),
            ("d:org1:sensor:dev2".to_owned(), "b".to_owned())
        ]
    );

    // One client, connected through the other instance: closed with 94.
    let (status, closed) = admin(
        &a,
        "POST",
        "/admin/orgs/org1/clients/d%3Aorg1%3Asensor%3Adev2/close",
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(
        (status, closed["closed"].as_u64()),
        (200, Some(1)),
        "{closed}"
    );
    dev2.closed().await;
    let disconnect = next_disconnect(&mut watcher, "org1/iot-2/type/sensor/id/dev2/mon").await;
    assert_eq!(disconnect["CloseCode"], 94);

    // Every client of the org, asked through b.
    let (status, closed) = admin(&b, "POST", "/admin/orgs/org1/close", Some(ADMIN_TOKEN)).await;
    assert_eq!(
        (status, closed["closed"].as_u64()),
        (200, Some(1)),
        "{closed}"
    );
    dev1.closed().await;
    let disconnect = next_disconnect(&mut watcher, "org1/iot-2/type/sensor/id/dev1/mon").await;
    assert_eq!(disconnect["CloseCode"], 94);
    assert_eq!(
        admin(&b, "GET", "/admin/orgs/org1/close", Some(ADMIN_TOKEN))
            .await
            .0,
        405
    );
}

#[tokio::test]
async fn without_coordination_the_admin_endpoints_act_on_the_one_process() {
    let broker = Broker::start().await;
    let warden = Warden::start_with(&broker, &standard_policy(), &admin_section()).await;
    let mut dev1 = v4::org1_device(warden.addr, "dev1").await;
    let _dev2 = v4::org1_device(warden.addr, "dev2").await;
    let (status, listed) = admin(
        &warden,
        "GET",
        "/admin/orgs/org1/sessions",
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(listed["sessions"].as_array().unwrap().len(), 2, "{listed}");
    assert_eq!(
        admin(
            &warden,
            "GET",
            "/admin/orgs/org2/sessions",
            Some(ADMIN_TOKEN)
        )
        .await
        .1["sessions"],
        serde_json::json!([])
    );
    let (status, closed) = admin(
        &warden,
        "POST",
        "/admin/orgs/org1/clients/d:org1:sensor:dev1/close",
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!((status, closed["closed"].as_u64()), (200, Some(1)));
    dev1.closed().await;
    assert_eq!(warden.running.admission.sessions().len(), 1);
}

/// The next Disconnect status on `topic`.
async fn next_disconnect(watcher: &mut v4::Client, topic: &str) -> serde_json::Value {
    loop {
        let status = next_status(watcher, topic).await;
        if status["Action"] == "Disconnect" {
            return status;
        }
    }
}
