//! How an instance reaches Redis: one server (`coordination.redis`) or a Redis Cluster
//! (`coordination.redis_cluster`), over TCP or TLS (`rediss://`, with `coordination.redis_ca`).
//! [`RedisLink`] dials the command connection, a [`RedisConn`] that reconnects by itself, and the
//! pub/sub connection of the instance's channel.
//!
//! With a Redis Cluster, commands go through the cluster client, which routes each one to the
//! node that holds its key's slot and follows the cluster when slots move; the keys of every
//! script share one hash tag, so each script runs on one node. Pub/sub stays classic: a PUBLISH
//! on any node of a cluster reaches the subscribers of every node over the cluster bus, so the
//! subscriber is one plain connection to one seed node, and it moves to the next seed node when
//! that one goes away. A PUBLISH's answer counts only the subscribers of the node that took it,
//! so in a cluster [`RedisLink::publish`] asks every node how many listen (`PUBSUB NUMSUB`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, PubSub};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncCommands, Cmd, Pipeline, RedisFuture, RedisResult, TlsCertificates, Value};
use thiserror::Error;

use crate::config::{CoordinationConfig, RedisEndpoint};

/// Why the link to Redis could not be set up.
#[derive(Debug, Error)]
pub enum LinkError {
    /// `coordination.redis_ca` could not be read.
    #[error("coordination.redis_ca {path}: {source}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The client could not be built from the URLs and certificates.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// The command connection: to one server, or to a Redis Cluster.
#[derive(Clone)]
pub enum RedisConn {
    /// One server, reconnected to by the connection manager.
    Node(ConnectionManager),
    /// A Redis Cluster, each command routed by its key's slot.
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Node(conn) => conn.req_packed_command(cmd),
            RedisConn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Node(conn) => conn.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Node(conn) => conn.get_db(),
            RedisConn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Where Redis is, and how to dial it.
pub struct RedisLink {
    /// The server, or each seed node of the cluster: the pub/sub connection dials these.
    nodes: Vec<redis::Client>,
    /// The cluster client, for a Redis Cluster.
    cluster: Option<ClusterClient>,
    /// The longest a connection attempt and a command's answer may take.
    timeout: Duration,
}

impl RedisLink {
    /// The link `config` describes; reads `redis_ca`. Dials nothing yet.
    pub fn new(config: &CoordinationConfig, timeout: Duration) -> Result<RedisLink, LinkError> {
        let certificates = match &config.redis_ca {
            Some(path) => Some(TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(path).map_err(|source| LinkError::Ca {
                    path: path.clone(),
                    source,
                })?),
            }),
            None => None,
        };
        let client = |info: &redis::ConnectionInfo| match &certificates {
            Some(certificates) => redis::Client::build_with_tls(info.clone(), certificates.clone()),
            None => redis::Client::open(info.clone()),
        };
        let nodes = config
            .redis
            .nodes()
            .iter()
            .map(client)
            .collect::<RedisResult<Vec<_>>>()?;
        let cluster = match &config.redis {
            RedisEndpoint::Node(_) => None,
            RedisEndpoint::Cluster(seeds) => {
                let mut builder = ClusterClientBuilder::new(seeds.clone())
                    .connection_timeout(timeout)
                    .response_timeout(timeout);
                if let Some(certificates) = certificates {
                    builder = builder.certs(certificates);
                }
                Some(builder.build()?)
            }
        };
        Ok(RedisLink {
            nodes,
            cluster,
            timeout,
        })
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// Dials the command connection (the caller bounds how long this may take).
    pub async fn connect(&self) -> RedisResult<RedisConn> {
        match &self.cluster {
            Some(cluster) => Ok(RedisConn::Cluster(cluster.get_async_connection().await?)),
            None => {
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(self.timeout))
                    .set_connection_timeout(Some(self.timeout))
                    .set_max_delay(Duration::from_secs(1));
                let node = self.nodes.first().cloned().ok_or_else(|| {
                    redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "no node"))
                })?;
                Ok(RedisConn::Node(
                    ConnectionManager::new_with_config(node, config).await?,
                ))
            }
        }
    }

    /// A pub/sub connection subscribed to `channels`, on the first node that answers, trying
    /// them in turn from node `from` (the seed nodes of a cluster, in the configured order), and
    /// which node that is: a subscriber whose node went away moves on from the next one.
    pub async fn subscribe(
        &self,
        channels: &[String],
        from: usize,
    ) -> RedisResult<(PubSub, usize)> {
        let count = self.nodes.len();
        let mut last = redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "no node"));
        for index in (from..from + count).map(|i| i % count) {
            let node = &self.nodes[index];
            let subscribed = tokio::time::timeout(self.timeout, async {
                let mut pubsub = node.get_async_pubsub().await?;
                pubsub.subscribe(channels).await?;
                Ok::<_, redis::RedisError>(pubsub)
            })
            .await;
            match subscribed {
                Ok(Ok(pubsub)) => return Ok((pubsub, index)),
                Ok(Err(error)) => last = error,
                Err(_) => {
                    last =
                        redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
                }
            }
        }
        Err(last)
    }

    /// Publishes `message` on `channel`; answers how many subscribers listen to the channel
    /// (on every node of a cluster).
    pub async fn publish(
        &self,
        conn: &mut RedisConn,
        channel: &str,
        message: &str,
    ) -> RedisResult<i64> {
        let heard: i64 = conn.publish(channel, message).await?;
        if !self.is_cluster() {
            return Ok(heard);
        }
        // Routed to every node by the cluster client, the counts summed per channel.
        let counts: HashMap<String, i64> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(conn)
            .await?;
        Ok(counts.get(channel).copied().unwrap_or(0))
    }
}
