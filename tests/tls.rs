//! TLS listeners: real clients (`mosquitto_pub`/`mosquitto_sub` with `--cafile` and client
//! certificates, rumqttc over rustls), the org security modes with their closing codes (169, 170,
//! 180), `Secure` and `Certname` in monitoring messages, hostile inputs on the TLS port (163),
//! certificate reload without dropping connections, and TLS towards the broker.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rumqttc::{ConnectReturnCode, QoS};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

use support::pki::TestPki;
use support::{mon, sha256_token, standard_policy, tls_client, v4, Broker, Warden, WAIT};

/// The standard orgs plus one org per TLS security mode.
fn tls_policy() -> String {
    let orgs = [
        ("tlstoken", "tls-token"),
        ("tlscert", "tls-cert"),
        ("tlsboth", "tls-token-and-cert"),
        ("tlseither", "tls-cert-or-token"),
    ];
    let mut policy = standard_policy();
    for (org, mode) in orgs {
        policy.push_str(&format!(
            r#"  {org}:
    security: {mode}
    device_types: {{ sensor: {{}} }}
    devices:
      sensor/dev1: {{ token: "{dev}" }}
      sensor/dev2: {{ token: "{dev}" }}
    api_keys:
      a-{org}-key1: {{ token: "{app}" }}
"#,
            dev = sha256_token("dev-token"),
            app = sha256_token("app-token"),
        ));
    }
    policy
}

/// A client of the broker itself (anonymous, below the proxy) watching raw monitoring topics.
async fn broker_watch(broker: &Broker, filter: &str) -> v4::Client {
    let addr = broker.addr().parse().unwrap();
    let mut watcher = v4::connect(addr, "test-broker-watcher", None, None)
        .await
        .unwrap();
    watcher.subscribe(filter, QoS::AtMostOnce).await;
    watcher
}

/// The next monitoring message on `topic` (broker form), skipping retained ones from before.
async fn next_mon(watcher: &mut v4::Client, topic: &str) -> serde_json::Value {
    loop {
        let publish = watcher.next_publish().await;
        if publish.topic == topic && !publish.payload.is_empty() {
            return mon::parse(&publish.payload);
        }
    }
}

async fn tls_connect(
    warden: &Warden,
    pki: &TestPki,
    cert: Option<(&Path, &Path)>,
    client_id: &str,
    user: Option<&str>,
    password: Option<&str>,
) -> Result<v4::Client, v4::Refused> {
    v4::connect_with(tls_client::options(
        warden.tls_addr(),
        &pki.ca_path,
        cert,
        client_id,
        user,
        password,
    ))
    .await
}

#[tokio::test]
async fn mosquitto_clients_over_tls_with_cafile_and_client_certificates() {
    let broker = Broker::start().await;
    let pki = TestPki::new("clients");
    let warden = Warden::start_tls(&broker, &tls_policy(), &pki, "").await;
    let port = warden.tls_addr().port().to_string();
    let ca = pki.ca_path.to_str().unwrap();

    // An application over TLS with a token; its own retained Connect proves the subscription.
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", "localhost", "-p", &port, "--cafile", ca])
        .args([
            "-i",
            "a:org1:tlscli",
            "-u",
            "a-org1-key0000001",
            "-P",
            "app-token",
        ])
        .args([
            "-t",
            "iot-2/app/tlscli/mon",
            "-t",
            "iot-2/type/+/id/+/evt/+/fmt/+",
            "-v",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub is installed");
    let mut lines = BufReader::new(sub.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("status arrives")
        .unwrap()
        .unwrap();
    let status = mon::parse(
        first
            .strip_prefix("iot-2/app/tlscli/mon ")
            .unwrap()
            .as_bytes(),
    );
    assert_eq!(status["Action"], "Connect");
    assert_eq!(status["Secure"], true);
    assert_eq!(status["Protocol"], "mqtt4");
    assert_eq!(status["Port"], warden.tls_addr().port());
    assert_eq!(status["Certname"], "");

    // A device of a tls-cert org with a client certificate and no token.
    let (cert, key) = pki.client("dev1", "dev1");
    let out = Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &port, "--cafile", ca])
        .args([
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ])
        .args([
            "-i",
            "d:tlscert:sensor:dev1",
            "-t",
            "iot-2/evt/t/fmt/txt",
            "-m",
            "hi",
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // A device of org1 (tls-optional) over TLS with its token: the application sees the event.
    let out = Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &port, "--cafile", ca])
        .args([
            "-i",
            "d:org1:sensor:dev1",
            "-u",
            "use-token-auth",
            "-P",
            "dev1-token",
        ])
        .args(["-t", "iot-2/evt/temp/fmt/txt", "-m", "21.5"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("event arrives")
        .unwrap()
        .unwrap();
    assert_eq!(line, "iot-2/type/sensor/id/dev1/evt/temp/fmt/txt 21.5");

    // Without the CA the client refuses the server: a failed handshake, counted.
    let before = warden.running.tls_handshake_failures();
    let other = TestPki::new("other");
    let out = Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &port])
        .args(["--cafile", other.ca_path.to_str().unwrap()])
        .args([
            "-i",
            "d:org1:sensor:dev1",
            "-u",
            "use-token-auth",
            "-P",
            "dev1-token",
        ])
        .args(["-t", "iot-2/evt/temp/fmt/txt", "-m", "x"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    wait_until(|| warden.running.tls_handshake_failures() > before).await;
}

async fn wait_until(mut condition: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await; // sleep-ok: polls a counter, which has no event to await
        }
    })
    .await
    .expect("condition reached");
}

#[tokio::test]
async fn security_modes_judge_certificates_and_tokens() {
    let broker = Broker::start().await;
    let pki = TestPki::new("modes");
    let other = TestPki::new("stranger");
    let warden = Warden::start_tls(&broker, &tls_policy(), &pki, "").await;
    let mut watcher = broker_watch(&broker, "+/iot-2/type/+/id/+/mon").await;
    let dev1 = pki.client("dev1", "dev1");
    let dev1_full = pki.client("dev1-full", "d:tlscert:sensor:dev1");
    let dev2 = pki.client("dev2", "dev2");
    let stranger = other.client("stranger", "dev1");
    let cert =
        |pair: &(std::path::PathBuf, std::path::PathBuf)| Some((pair.0.clone(), pair.1.clone()));

    struct Case {
        org: &'static str,
        cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
        token: Option<&'static str>,
        expect: Result<(), ConnectReturnCode>,
        close_code: u64,
        certname: &'static str,
    }
    let cases = [
        // tls-cert: the certificate alone; CN = device ID or the whole client ID.
        Case {
            org: "tlscert",
            cert: cert(&dev1),
            token: None,
            expect: Ok(()),
            close_code: 0,
            certname: "dev1",
        },
        Case {
            org: "tlscert",
            cert: cert(&dev1_full),
            token: None,
            expect: Ok(()),
            close_code: 0,
            certname: "d:tlscert:sensor:dev1",
        },
        Case {
            org: "tlscert",
            cert: None,
            token: Some("dev-token"),
            expect: Err(ConnectReturnCode::NotAuthorized),
            close_code: 169,
            certname: "",
        },
        Case {
            org: "tlscert",
            cert: cert(&dev2),
            token: None,
            expect: Err(ConnectReturnCode::NotAuthorized),
            close_code: 170,
            certname: "dev2",
        },
        Case {
            org: "tlscert",
            cert: cert(&stranger),
            token: None,
            expect: Err(ConnectReturnCode::NotAuthorized),
            close_code: 170,
            certname: "",
        },
        // tls-token-and-cert: both.
        Case {
            org: "tlsboth",
            cert: cert(&dev1),
            token: Some("dev-token"),
            expect: Ok(()),
            close_code: 0,
            certname: "dev1",
        },
        Case {
            org: "tlsboth",
            cert: cert(&dev1),
            token: None,
            expect: Err(ConnectReturnCode::BadUserNamePassword),
            close_code: 180,
            certname: "dev1",
        },
        Case {
            org: "tlsboth",
            cert: None,
            token: Some("dev-token"),
            expect: Err(ConnectReturnCode::NotAuthorized),
            close_code: 169,
            certname: "",
        },
        // tls-cert-or-token: either; a presented certificate must be valid.
        Case {
            org: "tlseither",
            cert: cert(&dev1),
            token: None,
            expect: Ok(()),
            close_code: 0,
            certname: "dev1",
        },
        Case {
            org: "tlseither",
            cert: None,
            token: Some("dev-token"),
            expect: Ok(()),
            close_code: 0,
            certname: "",
        },
        Case {
            org: "tlseither",
            cert: None,
            token: Some("wrong"),
            expect: Err(ConnectReturnCode::BadUserNamePassword),
            close_code: 180,
            certname: "",
        },
        Case {
            org: "tlseither",
            cert: cert(&stranger),
            token: Some("dev-token"),
            expect: Err(ConnectReturnCode::NotAuthorized),
            close_code: 170,
            certname: "",
        },
        // tls-token: certificates are not used, the token is.
        Case {
            org: "tlstoken",
            cert: cert(&stranger),
            token: Some("dev-token"),
            expect: Ok(()),
            close_code: 0,
            certname: "",
        },
        Case {
            org: "tlstoken",
            cert: cert(&dev1),
            token: None,
            expect: Err(ConnectReturnCode::BadUserNamePassword),
            close_code: 180,
            certname: "dev1",
        },
    ];
    for (index, case) in cases.iter().enumerate() {
        let client_id = format!("d:{}:sensor:dev1", case.org);
        let topic = format!("{}/iot-2/type/sensor/id/dev1/mon", case.org);
        let user = case.token.map(|_| "use-token-auth");
        let cert_pair = case.cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
        let result = tls_connect(&warden, &pki, cert_pair, &client_id, user, case.token).await;
        let report = next_mon(&mut watcher, &topic).await;
        match (&case.expect, result) {
            (Ok(()), Ok(client)) => {
                assert_eq!(report["Action"], "Connect", "case {index}");
                assert_eq!(report["Secure"], true, "case {index}");
                assert_eq!(report["Certname"], case.certname, "case {index}");
                client.disconnect().await;
                let disconnect = next_mon(&mut watcher, &topic).await;
                assert_eq!(disconnect["Action"], "Disconnect", "case {index}");
            }
            (Err(code), result) => {
                assert_eq!(result.err(), Some(v4::Refused::Code(*code)), "case {index}");
                assert_eq!(report["Action"], "FailedConnect", "case {index}");
                assert_eq!(report["CloseCode"], case.close_code, "case {index}");
                assert_eq!(report["Secure"], true, "case {index}");
                // Certname only ever names a certificate that verified against client_ca.
                assert_eq!(report["Certname"], case.certname, "case {index}");
            }
            (Ok(()), Err(refusal)) => panic!("case {index}: refused with {refusal:?}"),
        }
    }

    // A TLS org over plain TCP: 180.
    let plain = v4::connect(
        warden.addr,
        "d:tlstoken:sensor:dev1",
        Some("use-token-auth"),
        Some("dev-token"),
    )
    .await;
    assert_eq!(
        plain.err(),
        Some(v4::Refused::Code(ConnectReturnCode::NotAuthorized))
    );
    let report = next_mon(&mut watcher, "tlstoken/iot-2/type/sensor/id/dev1/mon").await;
    assert_eq!(
        (report["CloseCode"].as_u64(), &report["Secure"]),
        (Some(180), &serde_json::json!(false))
    );
}

#[tokio::test]
async fn applications_authenticate_by_api_key_certificate() {
    let broker = Broker::start().await;
    let pki = TestPki::new("apps");
    let warden = Warden::start_tls(&broker, &tls_policy(), &pki, "").await;
    let key_cert = pki.client("key1", "a-tlscert-key1");
    let pair = Some((key_cert.0.as_path(), key_cert.1.as_path()));
    // The API key still names the key (its role and groups); the certificate replaces the token.
    let app = tls_connect(
        &warden,
        &pki,
        pair,
        "a:tlscert:app1",
        Some("a-tlscert-key1"),
        None,
    )
    .await
    .expect("a certificate with the API key as CN authenticates the application");
    app.disconnect().await;
    let wrong_key = tls_connect(
        &warden,
        &pki,
        pair,
        "a:tlseither:app1",
        Some("a-tlseither-key1"),
        None,
    )
    .await;
    assert_eq!(
        wrong_key.err(),
        Some(v4::Refused::Code(ConnectReturnCode::NotAuthorized))
    );
}

#[tokio::test]
async fn quickstart_refuses_tls() {
    let broker = Broker::start().await;
    let pki = TestPki::new("quickstart");
    let warden = Warden::start_tls(&broker, &tls_policy(), &pki, "").await;
    let result = tls_connect(&warden, &pki, None, "d:quickstart:t:x1", None, None).await;
    assert_eq!(
        result.err(),
        Some(v4::Refused::Code(ConnectReturnCode::NotAuthorized))
    );
    // Over plain TCP it connects.
    v4::connect(warden.addr, "d:quickstart:t:x1", None, None)
        .await
        .expect("quickstart over TCP");
}

/// Reads until the proxy closes the connection; returns what it sent and how long it took.
async fn read_until_closed(stream: &mut TcpStream) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (received, started.elapsed()),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the proxy did not close the connection"),
        }
    }
}

/// A CONNECT for `d:org1:sensor:dev1` with its token (MQTT 3.1.1).
fn plain_connect() -> Vec<u8> {
    let client_id = b"d:org1:sensor:dev1";
    let user = b"use-token-auth";
    let password = b"dev1-token";
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 60];
    for field in [&client_id[..], &user[..], &password[..]] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field);
    }
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

#[tokio::test]
async fn hostile_inputs_on_the_tls_port_are_closed_and_counted() {
    let broker = Broker::start().await;
    let pki = TestPki::new("hostile");
    let warden = Warden::start_tls(
        &broker,
        &tls_policy(),
        &pki,
        "limits:\n  connect_timeout_secs: 2\n",
    )
    .await;
    let running = &warden.running;
    let failures = || running.tls_handshake_failures();

    // Plain MQTT sent to the TLS port: closed without an answer.
    let mut stream = TcpStream::connect(warden.tls_addr()).await.unwrap();
    stream.write_all(&plain_connect()).await.unwrap();
    let (answer, _) = read_until_closed(&mut stream).await;
    assert!(answer.is_empty(), "no CONNACK on a TLS port: {answer:?}");
    wait_until(|| failures() == 1).await;

    // Garbage before the handshake.
    let mut stream = TcpStream::connect(warden.tls_addr()).await.unwrap();
    stream
        .write_all(b"hello\r\n\x16\x03\x01\x00\x05")
        .await
        .unwrap();
    let (answer, _) = read_until_closed(&mut stream).await;
    assert!(answer.is_empty());
    wait_until(|| failures() == 2).await;

    // A handshake record that is garbage inside: rustls answers with an alert and closes.
    let mut stream = TcpStream::connect(warden.tls_addr()).await.unwrap();
    let mut record = vec![0x16, 0x03, 0x01, 0x00, 0x40];
    record.extend(std::iter::repeat_n(0xAB, 0x40));
    stream.write_all(&record).await.unwrap();
    let (answer, _) = read_until_closed(&mut stream).await;
    assert!(
        answer.first().is_none_or(|b| *b == 0x15),
        "an alert or nothing: {answer:?}"
    );
    wait_until(|| failures() == 3).await;

    // A handshake that stalls after its first bytes: closed within the (2 s) deadline.
    let mut stream = TcpStream::connect(warden.tls_addr()).await.unwrap();
    stream
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    let (_, took) = read_until_closed(&mut stream).await;
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "{took:?}"
    );
    wait_until(|| failures() == 4).await;

    // A client that connects and sends nothing: 164 after the connect deadline, not counted as TLS.
    let mut stream = TcpStream::connect(warden.tls_addr()).await.unwrap();
    let (_, took) = read_until_closed(&mut stream).await;
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(failures(), 4);

    // Meanwhile real clients still connect.
    let client = tls_connect(
        &warden,
        &pki,
        None,
        "d:org1:sensor:dev1",
        Some("use-token-auth"),
        Some("dev1-token"),
    )
    .await
    .expect("a good client connects");
    client.disconnect().await;
}

#[tokio::test]
async fn certificates_reload_without_dropping_connections() {
    let broker = Broker::start().await;
    let first = TestPki::new("first");
    let second = TestPki::new("second");
    // The listener reads its files from a folder of its own, so they can be replaced.
    let live = tempfile::tempdir().unwrap();
    let (cert, key) = (
        live.path().join("server.pem"),
        live.path().join("server.key"),
    );
    first.install_server_files(&cert, &key);
    let listeners = format!(
        "  - bind: \"127.0.0.1:0\"\n    tls: {{ cert: \"{}\", key: \"{}\" }}\n",
        cert.display(),
        key.display()
    );
    let warden = Warden::start_listeners(&broker, &standard_policy(), &listeners, "").await;
    let tls = warden.running.tls[0].clone();
    let options = |pki: &TestPki, id: &str| {
        tls_client::options(
            warden.addr,
            &pki.ca_path,
            None,
            id,
            Some("a-org1-key0000001"),
            Some("app-token"),
        )
    };

    let mut old = v4::connect_with(options(&first, "a:org1:old"))
        .await
        .unwrap();
    old.subscribe("iot-2/type/+/id/+/evt/+/fmt/+", QoS::AtMostOnce)
        .await;
    assert!(v4::connect_with(options(&second, "a:org1:new"))
        .await
        .is_err());

    // A changed file set is picked up by the poll, without a signal.
    second.install_server_files(&cert, &key);
    let reloads = tls.reloads();
    wait_until(|| tls.reloads() > reloads).await;
    let new = v4::connect_with(options(&second, "a:org1:new"))
        .await
        .expect("the new certificate is served");
    assert!(v4::connect_with(options(&first, "a:org1:stale"))
        .await
        .is_err());

    // The connection made before the reload still carries messages.
    new.client
        .publish(
            "iot-2/type/sensor/id/dev9/evt/e/fmt/txt",
            QoS::AtMostOnce,
            false,
            "after",
        )
        .await
        .unwrap();
    let delivered = old.next_publish().await;
    assert_eq!(&delivered.payload[..], b"after");

    // A broken file set is refused and the certificate in force stays.
    std::fs::write(&key, "not a key").unwrap();
    assert!(tls.reload().is_err());
    v4::connect_with(options(&second, "a:org1:still"))
        .await
        .expect("the last good certificate stays");
}

#[tokio::test]
async fn tls_towards_the_broker_with_a_client_certificate() {
    let pki = TestPki::new("broker");
    let (warden_cert, warden_key) = pki.client("warden", "warden");
    let broker = Broker::start_with(&format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        pki.ca_path.display(),
        pki.server_cert.display(),
        pki.server_key.display()
    ))
    .await;
    let upstream = format!(
        "  tls: {{ ca: \"{}\", cert: \"{}\", key: \"{}\", server_name: localhost }}\n",
        pki.ca_path.display(),
        warden_cert.display(),
        warden_key.display()
    );
    let warden = Warden::start_upstream(
        &broker,
        &standard_policy(),
        "  - bind: \"127.0.0.1:0\"\n",
        &upstream,
        "",
    )
    .await;
    warden.wait_monitor_connected().await;
    let mut app = v4::connect(
        warden.addr,
        "a:org1:upstream-tls",
        Some("a-org1-key0000001"),
        Some("app-token"),
    )
    .await
    .expect("the session reaches the broker over TLS");
    app.subscribe("iot-2/type/+/id/+/evt/+/fmt/+", QoS::AtLeastOnce)
        .await;
    let device = v4::org1_device(warden.addr, "dev1").await;
    device
        .client
        .publish("iot-2/evt/e/fmt/txt", QoS::AtLeastOnce, false, "over tls")
        .await
        .unwrap();
    assert_eq!(&app.next_publish().await.payload[..], b"over tls");
}

#[tokio::test]
async fn check_reports_unusable_tls_files_without_their_contents() {
    let pki = TestPki::new("check");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), standard_policy()).unwrap();
    // Well-formed PEM around bytes that are no key (assembled here: no key-like block is committed).
    let label = ["PRIVATE", "KEY"].join(" ");
    let secret_looking =
        format!("-----BEGIN {label}-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END {label}-----\n");
    std::fs::write(dir.path().join("bad.key"), secret_looking).unwrap();
    let config = dir.path().join("warden.yaml");
    std::fs::write(
        &config,
        format!(
            "listeners:\n  - bind: \"127.0.0.1:0\"\n    tls: {{ cert: \"{}\", key: bad.key }}\nupstream:\n  address: \"127.0.0.1:1\"\npolicies: policy.yaml\n",
            pki.server_cert.display()
        ),
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_mqtt-warden"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("listener 127.0.0.1:0"), "{stderr}");
    assert!(!stderr.contains("c2VjcmV0"), "{stderr}");
}

#[tokio::test]
async fn the_binary_reloads_certificates_on_sighup_and_keeps_running() {
    let broker = Broker::start().await;
    let pki = TestPki::new("sighup");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), standard_policy()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("warden.yaml");
    std::fs::write(
        &config,
        format!(
            "listeners:\n  - bind: \"127.0.0.1:{port}\"\n    tls: {{ cert: \"{}\", key: \"{}\" }}\nupstream:\n  address: \"{}\"\npolicies: policy.yaml\ntelemetry: {{ log_format: json }}\n",
            pki.server_cert.display(),
            pki.server_key.display(),
            broker.addr()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mqtt-warden"))
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    wait_for(&mut lines, "listening").await;

    let pid = child.id().unwrap().to_string();
    let status = Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    wait_for(&mut lines, "TLS certificate reloaded").await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP must not end the proxy"
    );

    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let options = tls_client::options(
        addr,
        &pki.ca_path,
        None,
        "d:org1:sensor:dev1",
        Some("use-token-auth"),
        Some("dev1-token"),
    );
    let client = v4::connect_with(options)
        .await
        .expect("connects after SIGHUP");
    client.disconnect().await;
}

/// Reads log lines until one contains `text`.
async fn wait_for(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    text: &str,
) {
    tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(text) {
                return;
            }
        }
        panic!("the proxy exited before logging {text:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no {text:?} in the log"));
}

#[tokio::test]
async fn serves_tls_1_2_and_1_3_only() {
    use std::sync::Arc;

    let broker = Broker::start().await;
    let pki = TestPki::new("versions");
    let warden = Warden::start_tls(&broker, &standard_policy(), &pki, "").await;
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(&pki.ca_path).unwrap();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let roots = Arc::new(roots);
    for (version, expected) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(warden.tls_addr()).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.expect("handshake");
        assert_eq!(tls.get_ref().1.protocol_version(), Some(expected));
        tls.write_all(&plain_connect()).await.unwrap();
        tls.flush().await.unwrap();
        let mut connack = [0u8; 4];
        tls.read_exact(&mut connack).await.unwrap();
        assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    }

    // TLS 1.1 (OpenSSL's client, with its own floor lowered) is refused in the handshake.
    let before = warden.running.tls_handshake_failures();
    let output = Command::new("openssl")
        .args(["s_client", "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"])
        .args(["-connect", &warden.tls_addr().to_string()])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("openssl is installed");
    assert!(!output.status.success(), "{output:?}");
    wait_until(|| warden.running.tls_handshake_failures() > before).await;
}
