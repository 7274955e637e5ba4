//! TLS (rustls, TLS 1.2 and 1.3 only): the listeners' server config loaded from PEM files and
//! reloaded in place, the client-certificate verdict of each connection, and the client config
//! for TLS towards the broker.
//!
//! # Client certificates
//!
//! With `client_ca` set, the server asks for a client certificate but does not require one, and
//! the TLS layer accepts any certificate whose holder proves its key (the handshake signature is
//! still checked). The chain is judged after the handshake against `client_ca`
//! ([`PeerCertificate`]), so that the org's security mode decides at CONNECT and the client gets
//! a CONNACK (169 / 170) rather than a bare TLS alert.
//!
//! # Reload
//!
//! [`ServerTls`] holds the config in an `ArcSwap`, read once per handshake. [`ServerTls::reload`]
//! builds a new one from the files and swaps it in; a file set that does not load is logged and the
//! last good config stays. Established connections keep the config they were made with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tracing::info;

use crate::config::{TlsConfig, UpstreamTlsConfig};

/// The TLS versions served and spoken: 1.3 and 1.2, nothing older.
static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Why TLS files could not be loaded. No error carries key material.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{}: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: rustls_pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{}: no certificate in the file", .0.display())]
    NoCertificate(PathBuf),
    /// A CA certificate was refused by the trust store.
    #[error("{}: unusable CA certificate: {source}", path.display())]
    BadCa {
        /// The file.
        path: PathBuf,
        /// The rustls error.
        source: rustls::Error,
    },
    /// The client verifier could not be built (for example an empty CA file).
    #[error("client CA: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
    /// rustls refused the certificate and key (for example a key that does not match).
    #[error("certificate and key: {0}")]
    Config(#[from] rustls::Error),
    /// The broker's server name is not a DNS name or IP address.
    #[error("invalid server name {0:?}")]
    ServerName(String),
}

/// The crypto provider: *ring*, with its default cipher suites.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Pem {
        path: path.to_owned(),
        source,
    })
}

fn root_store(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

/// What a client presented at the TLS layer, judged against the listener's `client_ca`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PeerCertificate {
    /// No certificate (or plain TCP, or a listener without `client_ca`).
    #[default]
    Absent,
    /// A certificate that chains to `client_ca`.
    Verified {
        /// The subject's common name, if it has one.
        common_name: Option<String>,
    },
    /// A certificate that does not verify (unknown CA, expired, wrong usage, ...).
    Invalid {
        /// Why, for logs and the reason string (no secret in it).
        reason: String,
    },
}

/// The subject common name of a DER certificate.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let name = parsed.subject().iter_common_name().next()?;
    name.as_str().ok().map(str::to_owned)
}

/// A client verifier that lets the handshake finish with any certificate whose key the client
/// holds; the chain is judged after the handshake by the strict verifier it wraps.
#[derive(Debug)]
struct DeferredVerifier {
    strict: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for DeferredVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.strict.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Judged after the handshake (`Loaded::judge`), so the org's mode decides: 169 / 170.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.strict.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.strict.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.strict.supported_verify_schemes()
    }
}

/// One loaded file set: the server config and the strict client verifier that goes with it.
struct Loaded {
    config: Arc<ServerConfig>,
    strict: Option<Arc<dyn ClientCertVerifier>>,
}

impl Loaded {
    fn from_files(files: &TlsConfig) -> Result<Loaded, TlsError> {
        let provider = provider();
        let certs = certificates(&files.cert)?;
        let key = private_key(&files.key)?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(PROTOCOL_VERSIONS)?;
        let (builder, strict) = match &files.client_ca {
            Some(ca) => {
                let strict = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(root_store(ca)?),
                    provider,
                )
                .build()?;
                let deferred = Arc::new(DeferredVerifier {
                    strict: strict.clone(),
                });
                (builder.with_client_cert_verifier(deferred), Some(strict))
            }
            None => (builder.with_no_client_auth(), None),
        };
        let config = builder.with_single_cert(certs, key)?;
        Ok(Loaded {
            config: Arc::new(config),
            strict,
        })
    }

    /// Judges the certificate chain a client presented.
    fn judge(&self, presented: Option<&[CertificateDer<'static>]>) -> PeerCertificate {
        let (Some(strict), Some([end_entity, intermediates @ ..])) = (&self.strict, presented)
        else {
            return PeerCertificate::Absent;
        };
        match strict.verify_client_cert(end_entity, intermediates, UnixTime::now()) {
            Ok(_) => PeerCertificate::Verified {
                common_name: common_name(end_entity),
            },
            Err(error) => PeerCertificate::Invalid {
                reason: error.to_string(),
            },
        }
    }
}

/// The files' modification times and sizes: a change means reload.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FilesStamp(Vec<Option<(SystemTime, u64)>>);

impl FilesStamp {
    fn of(files: &TlsConfig) -> FilesStamp {
        let paths = [
            Some(&files.cert),
            Some(&files.key),
            files.client_ca.as_ref(),
        ];
        FilesStamp(
            paths
                .into_iter()
                .flatten()
                .map(|path| {
                    let meta = std::fs::metadata(path).ok()?;
                    Some((meta.modified().ok()?, meta.len()))
                })
                .collect(),
        )
    }
}

/// A TLS listener's server side: the config in force and how to reload it.
pub struct ServerTls {
    files: TlsConfig,
    current: ArcSwap<Loaded>,
    /// The stamp of the files last tried (loaded or refused), so a broken set is logged once.
    stamp: Mutex<FilesStamp>,
    reloads: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert", &self.files.cert)
            .field("client_ca", &self.files.client_ca)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads a listener's certificate, key and client CA.
    pub fn load(files: &TlsConfig) -> Result<Arc<ServerTls>, TlsError> {
        let stamp = FilesStamp::of(files);
        let loaded = Loaded::from_files(files)?;
        Ok(Arc::new(ServerTls {
            files: files.clone(),
            current: ArcSwap::from_pointee(loaded),
            stamp: Mutex::new(stamp),
            reloads: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// Whether client certificates are asked for (`client_ca` is set).
    pub fn asks_for_client_certificates(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The files this listener's config comes from.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        [
            Some(&self.files.cert),
            Some(&self.files.key),
            self.files.client_ca.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(PathBuf::as_path)
    }

    /// Reloads the files now. On error the config in force stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamp = FilesStamp::of(&self.files);
        let result = Loaded::from_files(&self.files);
        if let Ok(mut last) = self.stamp.lock() {
            *last = stamp;
        }
        let loaded = result?;
        self.current.store(Arc::new(loaded));
        self.reloads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
        Ok(())
    }

    /// Reloads if a file changed since the last try; `Ok(true)` when a new config is in force.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let changed = match self.stamp.lock() {
            Ok(last) => *last != FilesStamp::of(&self.files),
            Err(_) => true,
        };
        if !changed {
            return Ok(false);
        }
        self.reload().map(|()| true)
    }

    /// Successful reloads so far.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs the server handshake with the config in force, and judges the client certificate.
    pub async fn accept<IO>(&self, io: IO) -> std::io::Result<(TlsStream<IO>, PeerCertificate)>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let loaded = self.current.load_full();
        let acceptor = tokio_rustls::TlsAcceptor::from(loaded.config.clone());
        let stream = acceptor.accept(io).await?;
        let certificate = loaded.judge(stream.get_ref().1.peer_certificates());
        Ok((stream, certificate))
    }
}

/// TLS towards the broker: the connector and the name to verify.
#[derive(Clone)]
pub struct UpstreamTls {
    /// The rustls connector.
    pub connector: tokio_rustls::TlsConnector,
    /// The name the broker's certificate must carry.
    pub server_name: rustls_pki_types::ServerName<'static>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// Loads the CA and optional client certificate; `default_host` names the broker when
    /// `server_name` is not set.
    pub fn load(config: &UpstreamTlsConfig, default_host: &str) -> Result<UpstreamTls, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(PROTOCOL_VERSIONS)?
            .with_root_certificates(root_store(&config.ca)?);
        let client_config = match (&config.cert, &config.key) {
            (Some(cert), Some(key)) => {
                builder.with_client_auth_cert(certificates(cert)?, private_key(key)?)?
            }
            _ => builder.with_no_client_auth(),
        };
        let name = config.server_name.as_deref().unwrap_or(default_host);
        let name = name.trim_start_matches('[').trim_end_matches(']');
        let server_name = rustls_pki_types::ServerName::try_from(name.to_owned())
            .map_err(|_| TlsError::ServerName(name.to_owned()))?;
        Ok(UpstreamTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(client_config)),
            server_name,
        })
    }
}
