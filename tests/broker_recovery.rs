//! Status messages and crash recovery in front of every supported broker, none of which may
//! rely on retained delivery to wildcard filters (RabbitMQ 3.x has none): a late wildcard
//! subscriber gets the current statuses, and a proxy killed with SIGKILL and started again
//! publishes the Disconnect of its devices. Also what scalable applications get on brokers
//! without shared subscriptions. One RabbitMQ node serves this binary.

mod support;

use rumqttc::QoS;
use support::brokers::{AnyBroker, BrokerKind};
use support::{mon, poll_until, standard_policy, v4, ProxyProcess, Redis, Warden, WAIT};

/// The monitoring filter of a late subscriber, as the application writes it.
const MON_FILTER: &str = "iot-2/type/+/id/+/mon";

/// A control client ID for `kind` with a `.` in it (which every ledger topic must escape),
/// except on the current NATS, which refuses `.` in client IDs.
fn instance_name(kind: BrokerKind) -> &'static str {
    if kind == BrokerKind::Nats {
        "instance-a"
    } else {
        "instance.a"
    }
}

/// A client of the test's own, straight at the broker, that watches one device's status topic
/// (an exact topic, so every broker delivers its retained message too).
async fn status_spy(broker: &AnyBroker, name: &str, device: &str) -> v4::Client {
    let mut spy = v4::connect_with(broker.client_options(name))
        .await
        .unwrap_or_else(|refused| panic!("{:?}: spy refused: {refused:?}", broker.kind));
    spy.subscribe(
        &format!("org1/iot-2/type/sensor/id/{device}/mon"),
        QoS::AtMostOnce,
    )
    .await;
    spy
}

/// The next status the client receives with this action, skipping others (a retained one
/// delivered on subscription, say), or why none came: the connection's end or the time out.
async fn status_or_why(client: &mut v4::Client, action: &str) -> Result<serde_json::Value, String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let status = mon::parse(&client.next_publish_or_why(left).await?.payload);
        if status["Action"] == action {
            return Ok(status);
        }
    }
}

/// As [`status_or_why`], failing the test with the broker and the reason.
async fn next_status(client: &mut v4::Client, action: &str, kind: BrokerKind) -> serde_json::Value {
    status_or_why(client, action)
        .await
        .unwrap_or_else(|why| panic!("{kind:?}: no {action} status: {why}"))
}

/// Whatever the broker, an application that subscribes to every device's status through the
/// proxy after a device connected receives that device's Connect, as a retained message.
#[tokio::test]
async fn a_late_wildcard_subscriber_gets_the_current_statuses_on_each_broker() {
    for kind in BrokerKind::ALL {
        let broker = AnyBroker::start(kind).await;
        let upstream = format!("  control_client_id: \"{}\"\n", instance_name(kind));
        let warden =
            support::Warden::start_in_front(&broker, &standard_policy(), &upstream, "").await;
        let mut spy = status_spy(&broker, "spy", "dev1").await;
        let _dev1 = v4::org1_device(warden.addr, "dev1").await;
        // The Connect reached the broker: the late subscriber comes after it.
        next_status(&mut spy, "Connect", kind).await;

        let mut late = v4::org1_app(warden.addr, "a:org1:late").await;
        late.subscribe(MON_FILTER, QoS::AtMostOnce).await;
        let replayed = late.next_publish().await;
        assert!(replayed.retain, "{kind:?}: delivered as a retained message");
        assert_eq!(replayed.topic, "iot-2/type/sensor/id/dev1/mon", "{kind:?}");
        let status = mon::parse(&replayed.payload);
        assert_eq!(
            (status["ClientID"].as_str(), status["Action"].as_str()),
            (Some("d:org1:sensor:dev1"), Some("Connect")),
            "{kind:?}"
        );
        warden.running.shutdown(WAIT).await;
        broker.stop().await;
    }
}

/// What a new wildcard subscriber through `addr` gets replayed for `device`: its status's
/// `Action` and `Sequence`, once `wanted` accepts them (statuses of other instances reach this
/// one's record through Redis, a moment after they were published).
async fn replayed_until(
    addr: std::net::SocketAddr,
    device: &str,
    wanted: impl Fn(&str, u64) -> bool,
) -> (String, u64) {
    static LATE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let client_id = format!("d:org1:sensor:{device}");
    poll_until(WAIT, &format!("a replayed status of {device}"), || {
        let attempt = LATE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let app = format!("a:org1:late{attempt}");
        let client_id = client_id.clone();
        let wanted = &wanted;
        async move {
            let mut late = v4::org1_app(addr, &app).await;
            late.subscribe(MON_FILTER, QoS::AtMostOnce).await;
            let mut found = None;
            while let Some(replayed) = late
                .next_publish_within(std::time::Duration::from_millis(300))
                .await
            {
                let status = mon::parse(&replayed.payload);
                if replayed.retain && status["ClientID"] == client_id.as_str() {
                    let action = status["Action"].as_str().unwrap_or_default().to_owned();
                    let sequence = status["Sequence"].as_u64().unwrap_or(0);
                    found = Some((action, sequence));
                }
            }
            late.disconnect().await;
            found.filter(|(action, sequence)| wanted(action, *sequence))
        }
    })
    .await
}

/// Two instances sharing Redis in front of RabbitMQ, which replays retained messages only to
/// filters without wildcards: a late wildcard subscriber on either instance gets the statuses
/// the other one published, in their true order after a takeover between them (a late
/// Disconnect never replaces the newer Connect), and an instance started later gets them too.
#[tokio::test]
async fn with_several_instances_a_late_wildcard_subscriber_gets_every_instances_statuses() {
    let broker = AnyBroker::start(BrokerKind::RabbitMq).await;
    let redis = Redis::start().await;
    let policy = standard_policy();
    let a = Warden::start_in_front(&broker, &policy, "", &redis.coordination("a")).await;
    let b = Warden::start_in_front(&broker, &policy, "", &redis.coordination("b")).await;
    let mut spy = status_spy(&broker, "spy", "dev1").await;

    let first = v4::org1_device(a.addr, "dev1").await;
    next_status(&mut spy, "Connect", BrokerKind::RabbitMq).await;
    let (_, connect_1) = replayed_until(b.addr, "dev1", |action, _| action == "Connect").await;
    assert!(
        connect_1 > 0,
        "statuses of coordinated instances are ordered"
    );

    // A takeover through b: a's Disconnect (288), then b's Connect, both replayed in order on a.
    let _second = v4::org1_device(b.addr, "dev1").await;
    let disconnect = next_status(&mut spy, "Disconnect", BrokerKind::RabbitMq).await;
    assert_eq!(disconnect["CloseCode"], 288);
    let connect = next_status(&mut spy, "Connect", BrokerKind::RabbitMq).await;
    let connect_2 = connect["Sequence"].as_u64().unwrap_or(0);
    assert!(connect_2 > connect_1 + 1, "{connect_2} after {connect_1}");
    drop(first);
    let on_a = replayed_until(a.addr, "dev1", |_, sequence| sequence >= connect_2).await;
    assert_eq!(on_a, ("Connect".to_owned(), connect_2));

    // An instance that starts now loads what the others published.
    let c = Warden::start_in_front(&broker, &policy, "", &redis.coordination("c")).await;
    let on_c = replayed_until(c.addr, "dev1", |_, _| true).await;
    assert_eq!(on_c, ("Connect".to_owned(), connect_2));

    c.running.shutdown(WAIT).await;
    b.running.shutdown(WAIT).await;
    a.running.shutdown(WAIT).await;
    broker.stop().await;
}

/// The proxy as a process of the real binary, named `instance` on the broker.
async fn proxy_process(dir: &std::path::Path, broker: &AnyBroker, instance: &str) -> ProxyProcess {
    let config = format!(
        "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  address: \"{}\"\n{}  control_client_id: \"{instance}\"\npolicies: policy.yaml\ntelemetry: {{ log_format: json }}\n",
        broker.addr(),
        broker.upstream_keys(),
    );
    ProxyProcess::start(dir, instance, &config, &[]).await
}

/// `kill -9` of the proxy, then a restart: the new process settles the devices the killed one
/// held (Disconnect, closing code 92), on every broker; a wildcard subscriber then sees that
/// Disconnect as the device's retained status.
#[tokio::test]
async fn a_proxy_killed_and_restarted_publishes_the_disconnect_of_its_devices_on_each_broker() {
    for kind in BrokerKind::ALL {
        let broker = AnyBroker::start(kind).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("policy.yaml"), standard_policy()).unwrap();
        let mut spy = status_spy(&broker, "spy", "dev1").await;
        let mut first = proxy_process(dir.path(), &broker, instance_name(kind)).await;
        let _dev1 = v4::org1_device(first.addr, "dev1").await;
        next_status(&mut spy, "Connect", kind).await;

        // SIGKILL: the dying process can send nothing.
        first.child.start_kill().unwrap();
        first.child.wait().await.unwrap();

        let restarted = proxy_process(dir.path(), &broker, instance_name(kind)).await;
        let status = status_or_why(&mut spy, "Disconnect")
            .await
            .unwrap_or_else(|why| {
                panic!(
                    "{kind:?}: no Disconnect status: {why}\nthe killed proxy's log:\n{}\nthe restarted proxy's log:\n{}",
                    first.kept_log(),
                    restarted.kept_log()
                )
            });
        assert_eq!(status["ClientID"], "d:org1:sensor:dev1", "{kind:?}");
        assert_eq!(status["CloseCode"], 92, "{kind:?}");

        // NATS keeps retained messages in a JetStream stream that each server reads back
        // asynchronously: under load a subscriber right after the publish can come too early,
        // so a late subscriber that got nothing tries again, within WAIT in all.
        let deadline = tokio::time::Instant::now() + WAIT;
        let replayed = loop {
            let mut late = v4::org1_app(restarted.addr, "a:org1:late").await;
            late.subscribe(MON_FILTER, QoS::AtMostOnce).await;
            if let Some(replayed) = late
                .next_publish_within(std::time::Duration::from_secs(2))
                .await
            {
                break replayed;
            }
            late.disconnect().await;
            assert!(
                tokio::time::Instant::now() < deadline,
                "{kind:?}: no retained status for a late subscriber"
            );
        };
        assert!(replayed.retain, "{kind:?}");
        let status = mon::parse(&replayed.payload);
        assert_eq!(
            (status["ClientID"].as_str(), status["Action"].as_str()),
            (Some("d:org1:sensor:dev1"), Some("Disconnect")),
            "{kind:?}"
        );
        drop(restarted);
        broker.stop().await;
    }
}

/// A scalable application's three connections on a broker without shared subscriptions: the
/// proxy hands each event to exactly one of them, spread over more than one, and stops at once
/// for one that leaves; a second proxy process cannot serve the same group and refuses the
/// SUBSCRIBE rather than accept it and deliver every event twice.
#[tokio::test]
async fn scalable_application_members_share_the_events_on_brokers_without_shared_subscriptions() {
    for kind in [BrokerKind::RabbitMq, BrokerKind::Nats29, BrokerKind::Nats] {
        let broker = AnyBroker::start(kind).await;
        let upstream = format!("  control_client_id: \"{}\"\n", instance_name(kind));
        let warden =
            support::Warden::start_in_front(&broker, &standard_policy(), &upstream, "").await;
        let mut members = Vec::new();
        for _ in 0..3 {
            let mut options = v4::options(
                warden.addr,
                "A:org1:pool",
                Some("a-org1-key0000001"),
                Some("app-token"),
            );
            options.set_clean_session(false);
            let mut member = v4::connect_with(options)
                .await
                .unwrap_or_else(|refused| panic!("{kind:?}: member refused: {refused:?}"));
            member
                .subscribe("iot-2/type/+/id/+/evt/+/fmt/+", QoS::AtLeastOnce)
                .await;
            members.push(member);
        }
        let mut device = v4::org1_device(warden.addr, "dev1").await;
        const EVENTS: usize = 30;
        for n in 0..EVENTS {
            assert!(
                device
                    .publish_acked("iot-2/evt/n/fmt/txt", n.to_string().into_bytes())
                    .await,
                "{kind:?}: PUBACK of event {n}"
            );
        }
        let mut seen = vec![0usize; EVENTS];
        let mut per_member = [0usize; 3];
        let mut received = 0;
        while received < EVENTS {
            let mut progress = false;
            for (at, member) in members.iter_mut().enumerate() {
                // A short wait per member: the next event may be on another one.
                if let Some(event) = member
                    .next_publish_within(std::time::Duration::from_millis(100))
                    .await
                {
                    let n: usize = String::from_utf8_lossy(&event.payload).parse().unwrap();
                    seen[n] += 1;
                    per_member[at] += 1;
                    received += 1;
                    progress = true;
                }
            }
            assert!(
                progress || received == EVENTS,
                "{kind:?}: only {received} of {EVENTS} events arrived: {seen:?}"
            );
        }
        // Nothing more comes: a duplicate would have been sent along with the events.
        for member in &mut members {
            assert!(
                member
                    .next_publish_within(std::time::Duration::from_millis(300))
                    .await
                    .is_none(),
                "{kind:?}: a duplicate"
            );
        }
        assert!(seen.iter().all(|count| *count == 1), "{kind:?}: {seen:?}");
        assert!(
            per_member.iter().filter(|count| **count > 0).count() > 1,
            "{kind:?}: spread over more than one member: {per_member:?}"
        );

        // Another proxy process in front of the same broker cannot serve the group too (each
        // event would go to one member per process): its member's SUBSCRIBE is refused.
        let other_upstream = "  control_client_id: \"other-instance\"\n";
        let other =
            support::Warden::start_in_front(&broker, &standard_policy(), other_upstream, "").await;
        let mut options = v4::options(
            other.addr,
            "A:org1:pool",
            Some("a-org1-key0000001"),
            Some("app-token"),
        );
        options.set_clean_session(false);
        let mut elsewhere = v4::connect_with(options).await.unwrap();
        let codes = elsewhere
            .subscribe_codes("iot-2/type/+/id/+/evt/+/fmt/+", QoS::AtLeastOnce)
            .await;
        assert_eq!(
            codes,
            [rumqttc::SubscribeReasonCode::Failure],
            "{kind:?}: refused on the second process"
        );

        // A member that leaves gets nothing more; the others get everything.
        if let Some(mut leaving) = members.pop() {
            leaving.disconnect().await;
            leaving.closed().await;
        }
        for n in 0..6 {
            assert!(
                device
                    .publish_acked("iot-2/evt/m/fmt/txt", vec![b'0' + n])
                    .await
            );
        }
        let mut after = 0;
        while after < 6 {
            let mut progress = false;
            for member in &mut members {
                if member
                    .next_publish_within(std::time::Duration::from_millis(100))
                    .await
                    .is_some()
                {
                    after += 1;
                    progress = true;
                }
            }
            assert!(
                progress || after == 6,
                "{kind:?}: only {after} of 6 after a member left"
            );
        }
        // Once the first process's group has no member left, its claim is gone and the other
        // process serves the application.
        for mut member in members {
            member.disconnect().await;
            member.closed().await;
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        while elsewhere
            .subscribe_codes("iot-2/type/+/id/+/evt/+/fmt/+", QoS::AtLeastOnce)
            .await
            == [rumqttc::SubscribeReasonCode::Failure]
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{kind:?}: the group is served by the other process once the first let it go"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await; // sleep-ok: the claim is cleared silently.
        }
        assert!(
            device
                .publish_acked("iot-2/evt/late/fmt/txt", b"x".to_vec())
                .await
        );
        assert_eq!(
            elsewhere.next_publish().await.topic,
            "iot-2/type/sensor/id/dev1/evt/late/fmt/txt",
            "{kind:?}"
        );
        other.running.shutdown(WAIT).await;
        warden.running.shutdown(WAIT).await;
        broker.stop().await;
    }
}
