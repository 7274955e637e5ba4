//! The official IBM Watson IoT Platform Python SDK (`wiotp-sdk` from PyPI, unmodified) as device
//! and application through the proxy: events, commands and device status.

mod support;

use support::{python, standard_policy, Broker, Warden};

#[tokio::test]
async fn wiotp_sdk_device_and_application_exchange_events_and_commands() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/wiotp_sdk_flow.py"
    );
    let output = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::process::Command::new(python())
            .arg(script)
            .arg(warden.addr.port().to_string())
            .output(),
    )
    .await
    .expect("the SDK flow finishes")
    .expect("python runs (scripts/test.sh installs wiotp-sdk in target/test-venv)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("wiotp-sdk flow ok"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
}
