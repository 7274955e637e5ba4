//! Test harness: a real Mosquitto on an ephemeral loopback port with a config written by the test,
//! the proxy started in-process on port 0, and real MQTT clients (rumqttc, the mosquitto CLIs).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use mqtt_warden::config::WardenConfig;
use mqtt_warden::proxy::{self, RunningProxy};

pub mod brokers;

/// How long a test waits for any one expected event.
pub const WAIT: Duration = Duration::from_secs(10);

/// Tries `attempt` until it gives `Some`, for at most `limit` (failing with `what`): for state a
/// test can only poll, such as a quota place or a lease kept in Redis, whose change sends the test
/// no event to wait for.
pub async fn poll_until<T, F, Fut>(limit: Duration, what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // sleep-ok: polled state signals nothing.
    }
}

/// The Python interpreter that runs the Python clients (wiotp-sdk, paho-mqtt): the one named by
/// `WARDEN_TEST_PYTHON` (scripts/test.sh sets it to its private environment), else that
/// environment's `target/test-venv/bin/python` when it exists, else `python3` from `PATH`.
pub fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("WARDEN_TEST_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(python);
    }
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("python3")
}

/// A Mosquitto process of the test's own.
pub struct Broker {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    _dir: TempDir,
    /// Its stderr log lines.
    pub log: mpsc::UnboundedReceiver<String>,
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}

impl Broker {
    /// Starts Mosquitto with anonymous access on a free loopback port.
    pub async fn start() -> Broker {
        Self::start_with("").await
    }

    /// Starts Mosquitto with extra config lines.
    pub async fn start_with(extra: &str) -> Broker {
        for _ in 0..5 {
            let port = free_port();
            if let Some(broker) = Self::try_start(port, extra).await {
                return broker;
            }
        }
        panic!("mosquitto did not start");
    }

    /// Starts Mosquitto on a given port (used to restart it on the same port).
    pub async fn start_on(port: u16, extra: &str) -> Option<Broker> {
        Self::try_start(port, extra).await
    }

    async fn try_start(port: u16, extra: &str) -> Option<Broker> {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n{extra}\n"
            ),
        )
        .expect("write mosquitto.conf");
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto is installed");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let running = tokio::time::timeout(WAIT, async {
            while let Some(line) = rx.recv().await {
                if line.contains(" running") {
                    return true;
                }
                if line.contains("Error") {
                    return false;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        if !running {
            let _ = child.kill().await;
            return None;
        }
        Some(Broker {
            child,
            port,
            _dir: dir,
            log: rx,
        })
    }

    /// Stops the broker.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
    }

    /// The broker's address.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// A `redis-server` process of the test's own: loopback only, no persistence, on a free port
/// (Redis refuses `--port 0`, so a free port is found by binding port 0 and releasing it, and
/// another is tried if something took it in between).
pub struct Redis {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    _dir: TempDir,
    /// Whether it serves TLS only ([`Redis::start_tls`]).
    tls: bool,
}

impl Redis {
    /// Starts `redis-server` on a free loopback port.
    pub async fn start() -> Redis {
        for _ in 0..5 {
            if let Some(redis) = Self::start_on(free_port()).await {
                return redis;
            }
        }
        panic!("redis-server did not start");
    }

    /// Starts `redis-server` on `port` (used to restart it on the same port).
    pub async fn start_on(port: u16) -> Option<Redis> {
        let (child, dir) = spawn_redis_server(&["--port".into(), port.to_string()]).await?;
        Some(Redis {
            child,
            port,
            _dir: dir,
            tls: false,
        })
    }

    /// Starts `redis-server` serving only TLS on a free loopback port, with the certificate of
    /// `pki` (for 127.0.0.1), no client certificate asked for, and `password` required.
    pub async fn start_tls(pki: &pki::TestPki, password: &str) -> Redis {
        for _ in 0..5 {
            let port = free_port();
            let mut args: Vec<String> = vec!["--port".into(), "0".into()];
            args.extend(["--tls-port".into(), port.to_string()]);
            for (flag, path) in [
                ("--tls-cert-file", &pki.server_cert),
                ("--tls-key-file", &pki.server_key),
                ("--tls-ca-cert-file", &pki.ca_path),
            ] {
                args.extend([flag.into(), path.display().to_string()]);
            }
            args.extend(["--tls-auth-clients".into(), "no".into()]);
            args.extend(["--requirepass".into(), password.into()]);
            if let Some((child, dir)) = spawn_redis_server(&args).await {
                return Redis {
                    child,
                    port,
                    _dir: dir,
                    tls: true,
                };
            }
        }
        panic!("redis-server with TLS did not start");
    }

    /// The URL for `coordination.redis`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// The `coordination:` config section for an instance named `instance`.
    pub fn coordination(&self, instance: &str) -> String {
        format!(
            "coordination:\n  redis: \"{}\"\n  instance_id: {instance}\n",
            self.url()
        )
    }

    /// Stops the server.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
    }
}

/// Runs `redis-server` on loopback without persistence, with `args` (which name its ports), in a
/// folder of its own; `None` when it could not listen (a port taken meanwhile).
async fn spawn_redis_server(args: &[String]) -> Option<(Child, TempDir)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1"])
        .args(args)
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server is installed (scripts/test.sh installs it)");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout piped")).lines();
    let ready = tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("Ready to accept connections") {
                return true;
            }
            // "... server TCP listening socket", "... server TLS listening socket", and the
            // cluster bus's "Could not bind ..." / "Failed listening on port ...".
            if line.contains("Could not create server")
                || line.contains("Failed listening")
                || line.contains("Could not bind")
            {
                return false;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    if !ready {
        let _ = child.kill().await;
        return None;
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Some((child, dir))
}

/// A Redis Cluster of the test's own: three masters (no replicas) on free loopback ports, each
/// with its cluster bus on its port + 10000, the slots spread by `redis-cli --cluster create`.
pub struct RedisCluster {
    /// The nodes, in the order they were started.
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    /// Starts three cluster nodes, joins them into one cluster and waits until every node says
    /// the cluster is ok.
    pub async fn start() -> RedisCluster {
        let mut nodes = Vec::new();
        while nodes.len() < 3 {
            nodes.push(start_cluster_node().await);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .expect("redis-cli is installed (it comes with redis-server)");
        assert!(created.success(), "redis-cli --cluster create failed");
        for node in &nodes {
            wait_cluster_ok(node).await;
        }
        RedisCluster { nodes }
    }

    /// Starts one more node and joins it to the cluster as a master without slots: it holds no
    /// keys, so the cluster stays ok when it stops, but it serves pub/sub like any node.
    pub async fn add_empty_node(&self) -> Redis {
        let node = start_cluster_node().await;
        let added = Command::new("redis-cli")
            .args(["--cluster", "add-node"])
            .arg(format!("127.0.0.1:{}", node.port))
            .arg(format!("127.0.0.1:{}", self.nodes[0].port))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .expect("redis-cli is installed (it comes with redis-server)");
        assert!(added.success(), "redis-cli --cluster add-node failed");
        wait_cluster_ok(&node).await;
        node
    }

    /// How many subscribers `channel` has on the nodes of [`RedisCluster::start`].
    pub async fn subscribers(&self, channel: &str) -> i64 {
        let mut total = 0;
        for node in &self.nodes {
            let client = redis::Client::open(node.url()).expect("node URL");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("a cluster node answers");
            let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(channel)
                .query_async(&mut conn)
                .await
                .expect("PUBSUB NUMSUB");
            total += counts.iter().map(|(_, count)| count).sum::<i64>();
        }
        total
    }

    /// The `coordination:` config section for an instance named `instance`, with the seed
    /// nodes listed from node `first` on (so that instances subscribe on different nodes),
    /// after the URLs of `before` (seeds that may not answer).
    pub fn coordination(&self, instance: &str, first: usize, before: &[String]) -> String {
        let seeds: Vec<String> = before
            .iter()
            .cloned()
            .chain((0..self.nodes.len()).map(|i| {
                let node = &self.nodes[(first + i) % self.nodes.len()];
                format!("redis://127.0.0.1:{}", node.port)
            }))
            .map(|url| format!("\"{url}\""))
            .collect();
        format!(
            "coordination:\n  redis_cluster: [{}]\n  instance_id: {instance}\n",
            seeds.join(", ")
        )
    }
}

/// A `redis-server` with cluster mode on, on a free port whose bus port is free too.
async fn start_cluster_node() -> Redis {
    for _ in 0..5 {
        let port = free_cluster_port();
        let args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "5000",
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect();
        if let Some((child, dir)) = spawn_redis_server(&args).await {
            return Redis {
                child,
                port,
                _dir: dir,
                tls: false,
            };
        }
    }
    panic!("a redis-server cluster node did not start");
}

/// Waits until `node` says the cluster is ok (every slot served, as it sees it).
async fn wait_cluster_ok(node: &Redis) {
    let client = redis::Client::open(node.url()).expect("node URL");
    poll_until(WAIT, "the cluster is ok on every node", || {
        let client = client.clone();
        async move {
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut conn)
                .await
                .ok()?;
            info.contains("cluster_state:ok").then_some(())
        }
    })
    .await;
}

/// A free loopback port whose cluster bus port (+10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= u16::MAX - 10_000
            && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
}

/// A plain HTTP/1.1 GET on the admin endpoint: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the admin endpoint accepts");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("request written");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

/// `sha256:<hex>` of a token, as a policy file stores it.
pub fn sha256_token(token: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(token.as_bytes())))
}

/// The policy most tests use: two orgs with a device, a gateway and an API key each, and quickstart.
pub fn standard_policy() -> String {
    format!(
        r#"
orgs:
  org1:
    limits: {{ publish_rate: {{ device: "100000/s", gateway: "100000/s", application: "100000/s" }} }}
    device_types:
      sensor: {{}}
      edge-gw: {{ class: gateway }}
    devices:
      sensor/dev1: {{ token: "{dev1}", groups: [line-1] }}
      sensor/dev2: {{ token: "{dev2}", groups: [line-2] }}
      edge-gw/gw1: {{ token: "{gw1}" }}
    api_keys:
      a-org1-key0000001: {{ token: "{app}" }}
  org2:
    limits: {{ publish_rate: {{ device: "100000/s", gateway: "100000/s", application: "100000/s" }} }}
    device_types:
      sensor: {{}}
    devices:
      sensor/dev1: {{ token: "{org2dev}" }}
    api_keys:
      a-org2-key0000002: {{ token: "{org2app}" }}
  quickstart: {{ quickstart: true }}
"#,
        dev1 = sha256_token("dev1-token"),
        dev2 = sha256_token("dev2-token"),
        gw1 = sha256_token("gw1-token"),
        app = sha256_token("app-token"),
        org2dev = sha256_token("org2-dev-token"),
        org2app = sha256_token("org2-app-token"),
    )
}

/// A proxy running in this test process.
pub struct Warden {
    /// The client-facing address.
    pub addr: SocketAddr,
    /// The running proxy.
    pub running: RunningProxy,
    /// The folder holding its config and policy.
    pub dir: TempDir,
}

impl Warden {
    /// Starts the proxy in front of `broker` with `policy` and the default config.
    pub async fn start(broker: &Broker, policy: &str) -> Warden {
        Self::start_with(broker, policy, "").await
    }

    /// Starts the proxy with extra top-level config YAML (for example a `limits:` section).
    pub async fn start_with(broker: &Broker, policy: &str, extra_config: &str) -> Warden {
        Self::start_upstream(
            broker,
            policy,
            "  - bind: \"127.0.0.1:0\"",
            "",
            extra_config,
        )
        .await
    }

    /// The path of the policy file.
    pub fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.yaml")
    }

    /// Waits until the monitor's control connection is up.
    pub async fn wait_monitor_connected(&self) {
        let monitor = &self.running.monitor;
        tokio::time::timeout(WAIT, async {
            while !monitor.is_connected() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("monitor connects");
    }
}

/// A proxy process of the real binary; its listen address is read from its JSON log.
pub struct ProxyProcess {
    /// The child process.
    pub child: Child,
    /// The client-facing address.
    pub addr: SocketAddr,
    /// The last lines the process logged (at most [`KEPT_LOG_LINES`]), for a failing test to show.
    pub log: Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
}

/// How many of a proxy process's last log lines a test keeps.
pub const KEPT_LOG_LINES: usize = 400;

impl ProxyProcess {
    /// Writes `config` (which must set `telemetry.log_format: json`) as `NAME.yaml` in `dir`,
    /// runs `mqtt-warden run` on it with extra environment variables, and waits until it listens.
    pub async fn start(
        dir: &std::path::Path,
        name: &str,
        config: &str,
        env: &[(&str, &str)],
    ) -> ProxyProcess {
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, config).expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_mqtt-warden"))
            .args(["run", "--config"])
            .arg(&path)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the binary runs");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout piped")).lines();
        let log = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        let keep = {
            let log = log.clone();
            move |line: &str| {
                if let Ok(mut kept) = log.lock() {
                    if kept.len() == KEPT_LOG_LINES {
                        kept.pop_front();
                    }
                    kept.push_back(line.to_owned());
                }
            }
        };
        let addr = tokio::time::timeout(WAIT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                keep(&line);
                let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if entry["fields"]["message"] == "listening" {
                    return entry["fields"]["address"]
                        .as_str()
                        .and_then(|a| a.parse().ok())
                        .expect("address");
                }
            }
            panic!("the proxy exited before listening");
        })
        .await
        .expect("the proxy starts");
        // Keep draining the log so the child never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                keep(&line);
            }
        });
        ProxyProcess { child, addr, log }
    }

    /// The kept log lines, one per line, for a failure message.
    pub fn kept_log(&self) -> String {
        self.log
            .lock()
            .map(|kept| kept.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }
}

pub mod v4 {
    //! MQTT 3.1.1 clients (rumqttc).
    use super::*;
    use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, Publish, QoS};

    /// A connected client and the events its event loop produced.
    pub struct Client {
        /// The rumqttc handle.
        pub client: AsyncClient,
        events: mpsc::UnboundedReceiver<Result<Packet, String>>,
    }

    /// Why a connect did not succeed.
    #[derive(Debug, PartialEq)]
    pub enum Refused {
        /// CONNACK with this code.
        Code(ConnectReturnCode),
        /// Closed or failed otherwise.
        Other(String),
    }

    /// Options for a client of the proxy.
    pub fn options(
        addr: SocketAddr,
        client_id: &str,
        user: Option<&str>,
        password: Option<&str>,
    ) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(512 * 1024, 512 * 1024);
        if let Some(user) = user {
            options.set_credentials(user, password.unwrap_or(""));
        }
        options
    }

    /// Connects and waits for CONNACK.
    pub async fn connect(
        addr: SocketAddr,
        client_id: &str,
        user: Option<&str>,
        password: Option<&str>,
    ) -> Result<Client, Refused> {
        connect_with(options(addr, client_id, user, password)).await
    }

    /// Connects device `sensor/DEVICE` of org1 in [`standard_policy`](super::standard_policy)
    /// with its token (`DEVICE-token`), and waits for a successful CONNACK.
    pub async fn org1_device(addr: SocketAddr, device: &str) -> Client {
        let token = format!("{device}-token");
        let client_id = format!("d:org1:sensor:{device}");
        connect(addr, &client_id, Some("use-token-auth"), Some(&token))
            .await
            .unwrap_or_else(|refused| panic!("{client_id} refused: {refused:?}"))
    }

    /// Connects application `client_id` (`a:org1:...`) with org1's standard API key, and waits
    /// for a successful CONNACK.
    pub async fn org1_app(addr: SocketAddr, client_id: &str) -> Client {
        connect(
            addr,
            client_id,
            Some("a-org1-key0000001"),
            Some("app-token"),
        )
        .await
        .unwrap_or_else(|refused| panic!("{client_id} refused: {refused:?}"))
    }

    /// Connects with custom options and waits for CONNACK.
    pub async fn connect_with(options: MqttOptions) -> Result<Client, Refused> {
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        let (tx, rx) = mpsc::unbounded_channel();
        let first = tokio::time::timeout(WAIT, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack),
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                        return Err(Refused::Code(code))
                    }
                    Err(error) => return Err(Refused::Other(error.to_string())),
                }
            }
        })
        .await
        .map_err(|_| Refused::Other("timed out".into()))??;
        assert_eq!(first.code, ConnectReturnCode::Success);
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(packet)) => {
                        if tx.send(Ok(packet)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(error) => {
                        let _ = tx.send(Err(error.to_string()));
                        return;
                    }
                }
            }
        });
        Ok(Client { client, events: rx })
    }

    impl Client {
        /// The next PUBLISH received, within [`WAIT`].
        pub async fn next_publish(&mut self) -> Publish {
            self.next_publish_within(WAIT)
                .await
                .expect("a publish arrives")
        }

        /// The next PUBLISH received within `limit`, or why none came: the connection's error,
        /// or the time out.
        pub async fn next_publish_or_why(&mut self, limit: Duration) -> Result<Publish, String> {
            tokio::time::timeout(limit, async {
                loop {
                    match self.events.recv().await {
                        Some(Ok(Packet::Publish(publish))) => return Ok(publish),
                        Some(Ok(_)) => {}
                        Some(Err(error)) => return Err(format!("connection ended: {error}")),
                        None => return Err("connection ended".to_owned()),
                    }
                }
            })
            .await
            .unwrap_or_else(|_| Err(format!("nothing within {limit:?}")))
        }

        /// The next PUBLISH received within `limit`, or `None`.
        pub async fn next_publish_within(&mut self, limit: Duration) -> Option<Publish> {
            self.next_publish_or_why(limit).await.ok()
        }

        /// Publishes `payload` at QoS 1 and waits for its PUBACK (one message in flight):
        /// `false` when the connection ended, or nothing came within [`WAIT`], first.
        pub async fn publish_acked(&mut self, topic: &str, payload: Vec<u8>) -> bool {
            if self
                .client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                return false;
            }
            tokio::time::timeout(WAIT, async {
                loop {
                    match self.events.recv().await {
                        Some(Ok(Packet::PubAck(_))) => return true,
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => return false,
                    }
                }
            })
            .await
            .unwrap_or(false)
        }

        /// Waits for the next SUBACK and returns its return codes.
        pub async fn suback(&mut self) -> Vec<rumqttc::SubscribeReasonCode> {
            tokio::time::timeout(WAIT, async {
                loop {
                    match self.events.recv().await {
                        Some(Ok(Packet::SubAck(ack))) => return ack.return_codes,
                        Some(Ok(_)) => {}
                        other => panic!("connection ended before SUBACK: {other:?}"),
                    }
                }
            })
            .await
            .expect("SUBACK arrives")
        }

        /// Waits for the next UNSUBACK.
        pub async fn unsuback(&mut self) {
            tokio::time::timeout(WAIT, async {
                loop {
                    match self.events.recv().await {
                        Some(Ok(Packet::UnsubAck(_))) => return,
                        Some(Ok(_)) => {}
                        other => panic!("connection ended before UNSUBACK: {other:?}"),
                    }
                }
            })
            .await
            .expect("UNSUBACK arrives")
        }

        /// Subscribes and waits for the SUBACK.
        pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
            let codes = self.subscribe_codes(filter, qos).await;
            assert!(
                codes
                    .iter()
                    .all(|code| !matches!(code, rumqttc::SubscribeReasonCode::Failure)),
                "subscription to {filter} refused"
            );
        }

        /// Subscribes to one filter and returns the SUBACK's codes, granted or not.
        pub async fn subscribe_codes(
            &mut self,
            filter: &str,
            qos: QoS,
        ) -> Vec<rumqttc::SubscribeReasonCode> {
            self.client
                .subscribe(filter, qos)
                .await
                .expect("subscribe queued");
            self.suback().await
        }

        /// Waits until the connection ends (closed by the proxy) and returns the error text.
        pub async fn closed(&mut self) -> String {
            tokio::time::timeout(WAIT, async {
                loop {
                    match self.events.recv().await {
                        Some(Ok(_)) => {}
                        Some(Err(error)) => return error,
                        None => return "event loop ended".to_string(),
                    }
                }
            })
            .await
            .expect("the connection closes")
        }

        /// Sends DISCONNECT.
        pub async fn disconnect(&self) {
            let _ = self.client.disconnect().await;
        }
    }
}

pub mod mon {
    //! Reading monitoring messages.
    use serde_json::Value;

    /// Parses a monitoring payload.
    pub fn parse(payload: &[u8]) -> Value {
        serde_json::from_slice(payload).expect("monitoring payload is JSON")
    }
}

impl Warden {
    /// Starts the proxy with the given `listeners:` entries (YAML list items, indented by two
    /// spaces) and extra top-level config YAML. `addr` is the first listener's address.
    pub async fn start_listeners(
        broker: &Broker,
        policy: &str,
        listeners: &str,
        extra_config: &str,
    ) -> Warden {
        Self::start_upstream(broker, policy, listeners, "", extra_config).await
    }

    /// As [`Warden::start_listeners`], with extra `upstream:` keys (indented by two spaces).
    pub async fn start_upstream(
        broker: &Broker,
        policy: &str,
        listeners: &str,
        upstream_extra: &str,
        extra_config: &str,
    ) -> Warden {
        Self::start_at(
            &broker.addr(),
            policy,
            listeners,
            upstream_extra,
            extra_config,
        )
        .await
    }

    /// Starts the proxy in front of a broker of any kind, with its `upstream.broker` and
    /// credentials, extra `upstream:` keys (indented by two spaces) and extra top-level YAML.
    pub async fn start_in_front(
        broker: &brokers::AnyBroker,
        policy: &str,
        upstream_extra: &str,
        extra_config: &str,
    ) -> Warden {
        let upstream = format!("{}{upstream_extra}", broker.upstream_keys());
        Self::start_at(
            &broker.addr(),
            policy,
            "  - bind: \"127.0.0.1:0\"",
            &upstream,
            extra_config,
        )
        .await
    }

    /// Starts the proxy in front of `address` with extra `upstream:` keys (indented by two
    /// spaces), for brokers the test plays itself or misconfigures on purpose.
    pub async fn start_at(
        address: &str,
        policy: &str,
        listeners: &str,
        upstream_extra: &str,
        extra_config: &str,
    ) -> Warden {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("policy.yaml"), policy).expect("write policy");
        let config_path = dir.path().join("warden.yaml");
        let text = format!(
            "listeners:\n{listeners}\nupstream:\n  address: \"{address}\"\n  topic_prefix: \"{{org}}/\"\n{upstream_extra}\npolicies: policy.yaml\n{extra_config}\n"
        );
        std::fs::write(&config_path, &text).expect("write config");
        let config = WardenConfig::from_yaml(&text, &config_path).expect("valid config");
        let running = proxy::start(config).await.expect("proxy starts");
        Warden {
            addr: running.listen_addrs[0],
            running,
            dir,
        }
    }

    /// Starts the proxy in front of a broker cluster: `upstream.addresses` lists `nodes`;
    /// `upstream_extra` holds more `upstream:` keys (each indented by two spaces, ending in a
    /// newline).
    pub async fn start_nodes(
        nodes: &[String],
        policy: &str,
        upstream_extra: &str,
        extra_config: &str,
    ) -> Warden {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("policy.yaml"), policy).expect("write policy");
        let config_path = dir.path().join("warden.yaml");
        let addresses: String = nodes
            .iter()
            .map(|node| format!("    - \"{node}\"\n"))
            .collect();
        let text = format!(
            "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  addresses:\n{addresses}  topic_prefix: \"{{org}}/\"\n{upstream_extra}\npolicies: policy.yaml\n{extra_config}\n"
        );
        std::fs::write(&config_path, &text).expect("write config");
        let config = WardenConfig::from_yaml(&text, &config_path).expect("valid config");
        let running = proxy::start(config).await.expect("proxy starts");
        Warden {
            addr: running.listen_addrs[0],
            running,
            dir,
        }
    }

    /// Starts the proxy with a plain listener (`addr`) and a TLS listener ([`Warden::tls_addr`])
    /// that asks for client certificates signed by `pki`'s CA.
    pub async fn start_tls(
        broker: &Broker,
        policy: &str,
        pki: &pki::TestPki,
        extra_config: &str,
    ) -> Warden {
        let listeners = format!(
            "  - bind: \"127.0.0.1:0\"\n  - bind: \"127.0.0.1:0\"\n    tls: {{ cert: \"{}\", key: \"{}\", client_ca: \"{}\" }}\n",
            pki.server_cert.display(),
            pki.server_key.display(),
            pki.ca_path.display()
        );
        Self::start_listeners(broker, policy, &listeners, extra_config).await
    }

    /// The second listener's address (the TLS listener of [`Warden::start_tls`]).
    pub fn tls_addr(&self) -> SocketAddr {
        self.running.listen_addrs[1]
    }
}

pub mod pki {
    //! Throwaway test certificates (rcgen), written as PEM files to a temporary folder. Nothing
    //! here is committed: every run makes new keys.
    use std::path::{Path, PathBuf};

    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    use tempfile::TempDir;

    /// The names the test server certificate carries.
    pub const SERVER_NAMES: &[&str] = &[
        "localhost",
        "127.0.0.1",
        "org1.messaging.warden.test",
        "tlsorg.messaging.warden.test",
    ];

    /// A CA with a server certificate, able to issue client certificates.
    pub struct TestPki {
        /// The folder holding the PEM files.
        pub dir: TempDir,
        ca: CertifiedIssuer<'static, KeyPair>,
        /// The CA certificate.
        pub ca_path: PathBuf,
        /// The server certificate (signed by the CA).
        pub server_cert: PathBuf,
        /// Its key.
        pub server_key: PathBuf,
    }

    impl TestPki {
        /// A new CA named `name`, and a server certificate for [`SERVER_NAMES`].
        pub fn new(name: &str) -> TestPki {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params
                .distinguished_name
                .push(DnType::CommonName, format!("{name} test CA"));
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key"))
                .expect("CA certificate");
            let ca_path = dir.path().join("ca.pem");
            std::fs::write(&ca_path, ca.pem()).expect("write CA");
            let mut pki = TestPki {
                ca_path,
                server_cert: PathBuf::new(),
                server_key: PathBuf::new(),
                ca,
                dir,
            };
            let (cert, key) = pki.server("server", SERVER_NAMES);
            pki.server_cert = cert;
            pki.server_key = key;
            pki
        }

        /// Issues a server certificate for `names`, written as `<stem>.pem` / `<stem>.key`.
        pub fn server(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let mut params = CertificateParams::new(names).expect("server names");
            params
                .distinguished_name
                .push(DnType::CommonName, "localhost");
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            self.issue(stem, params)
        }

        /// Issues a client certificate with this common name, as `<stem>.pem` / `<stem>.key`.
        pub fn client(&self, stem: &str, common_name: &str) -> (PathBuf, PathBuf) {
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            self.issue(stem, params)
        }

        fn issue(&self, stem: &str, params: CertificateParams) -> (PathBuf, PathBuf) {
            let key = KeyPair::generate().expect("key");
            let cert = params.signed_by(&key, &self.ca).expect("sign");
            let cert_path = self.dir.path().join(format!("{stem}.pem"));
            let key_path = self.dir.path().join(format!("{stem}.key"));
            std::fs::write(&cert_path, cert.pem()).expect("write certificate");
            std::fs::write(&key_path, key.serialize_pem()).expect("write key");
            (cert_path, key_path)
        }

        /// Copies this PKI's server certificate and key over `cert` and `key` (for reloads).
        pub fn install_server_files(&self, cert: &Path, key: &Path) {
            std::fs::copy(&self.server_cert, cert).expect("copy certificate");
            std::fs::copy(&self.server_key, key).expect("copy key");
        }
    }
}

pub mod tls_client {
    //! MQTT 3.1.1 clients over TLS (rumqttc with rustls).
    use super::*;
    use rumqttc::{MqttOptions, TlsConfiguration, Transport};

    /// Options for a TLS client of `addr` that trusts `ca`, optionally with a client certificate.
    pub fn options(
        addr: SocketAddr,
        ca: &std::path::Path,
        client_cert: Option<(&std::path::Path, &std::path::Path)>,
        client_id: &str,
        user: Option<&str>,
        password: Option<&str>,
    ) -> MqttOptions {
        let mut options = v4::options(addr, client_id, user, password);
        let _ = options.set_transport(Transport::Tls(TlsConfiguration::Simple {
            ca: std::fs::read(ca).expect("read CA"),
            alpn: None,
            client_auth: client_cert.map(|(cert, key)| {
                (
                    std::fs::read(cert).expect("read client certificate"),
                    std::fs::read(key).expect("read client key"),
                )
            }),
        }));
        options
    }
}

pub mod raw {
    //! Hand-written packets, for malformed-input and reason-code tests only.
    use bytes::BytesMut;
    use mqtt_warden::codec::{encode_connect, Connect, ProtocolVersion};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// A CONNECT packet.
    pub fn connect_packet(
        version: ProtocolVersion,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
        keep_alive: u16,
    ) -> BytesMut {
        let mut out = BytesMut::new();
        let connect = Connect {
            version,
            clean_start: true,
            keep_alive,
            properties: Vec::new(),
            client_id,
            will: None,
            username,
            password,
        };
        encode_connect(&mut out, &connect);
        out
    }

    /// Sends a CONNECT and returns the stream and the whole CONNACK packet.
    pub async fn connect(
        addr: std::net::SocketAddr,
        version: ProtocolVersion,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
        keep_alive: u16,
    ) -> (TcpStream, Vec<u8>) {
        let mut stream = TcpStream::connect(addr).await.expect("proxy reachable");
        let packet = connect_packet(version, client_id, username, password, keep_alive);
        stream.write_all(&packet).await.expect("CONNECT sent");
        let mut header = [0u8; 2];
        stream
            .read_exact(&mut header)
            .await
            .expect("CONNACK header");
        let mut rest = vec![0u8; usize::from(header[1])];
        stream.read_exact(&mut rest).await.expect("CONNACK body");
        (stream, [header.to_vec(), rest].concat())
    }
}
