//! The broker going away and coming back: sessions close with 92, new CONNECTs get 167, and
//! monitoring messages wait in the queue until the control connection is back.

mod support;

use rumqttc::{ConnectReturnCode, QoS};
use support::{mon, standard_policy, v4, Broker, Warden, WAIT};

#[tokio::test]
async fn broker_outage_closes_sessions_refuses_connects_and_keeps_monitoring_messages() {
    let broker = Broker::start().await;
    let port = broker.port;
    let warden = Warden::start(&broker, &standard_policy()).await;
    warden.wait_monitor_connected().await;
    let mut device = v4::org1_device(warden.addr, "dev1").await;

    broker.stop().await;
    // The live session ends (92); its Disconnect message is queued.
    device.closed().await;
    // A new CONNECT is refused with "server unavailable" (167); its FailedConnect is queued too.
    let refused = v4::connect(
        warden.addr,
        "d:org1:sensor:dev2",
        Some("use-token-auth"),
        Some("dev2-token"),
    )
    .await;
    assert_eq!(
        refused.err(),
        Some(v4::Refused::Code(ConnectReturnCode::ServiceUnavailable))
    );

    let published = &warden.running.metrics.monitor.published;
    let confirmed_before = published.get();

    // The broker returns on the same port; the queued messages are flushed and confirmed.
    let broker = Broker::start_on(port, "")
        .await
        .expect("broker restarts on its port");
    tokio::time::timeout(WAIT, async {
        while published.get() < confirmed_before + 2 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("queued monitoring messages are published after the broker returns");

    // The retained Disconnect of dev1 is on the broker now, with code 92.
    let mut app = v4::org1_app(warden.addr, "a:org1:watch").await;
    app.subscribe("iot-2/type/sensor/id/dev1/mon", QoS::AtMostOnce)
        .await;
    let retained = app.next_publish().await;
    let status = mon::parse(&retained.payload);
    assert_eq!(status["Action"], "Disconnect");
    assert_eq!(status["CloseCode"], 92);
    drop(broker);
}
