//! TLS 1.3 with mutual authentication on every connection (rustls, the
//! `ring` provider).
//!
//! Both sides present a certificate from the same CA: the destination (the
//! TLS server) refuses a source without one or with one from another CA,
//! the source refuses a destination whose certificate does not name the
//! address it dialled (or `--tls-server-name`). rustls runs the handshake;
//! the records that follow are this crate's (`record`), each half of the
//! connection owning its direction.

use crate::record::{NextKeys, Opener, Sealer, Shared};
use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::UnbufferedServerConnection;
use rustls::server::WebPkiClientVerifier;
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Why TLS settings could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{what} {path}: {problem}")]
    Pem {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// rustls refused the settings (a key that does not match, say).
    #[error("TLS settings: {0}")]
    Config(String),
}

/// The certificate files of one side.
#[derive(Debug, Clone)]
pub struct TlsFiles<'a> {
    /// This side's certificate chain (PEM).
    pub cert: &'a Path,
    /// Its private key (PEM).
    pub key: &'a Path,
    /// The CA that signs both sides' certificates (PEM).
    pub ca: &'a Path,
}

/// TLS settings of one side: the source is the client, the destination
/// the server.
#[derive(Clone)]
pub struct TlsConfig {
    role: Role,
}

#[derive(Clone)]
enum Role {
    Client {
        config: Arc<ClientConfig>,
        server_name: Option<ServerName<'static>>,
    },
    Server {
        config: Arc<ServerConfig>,
        /// Client identities accepted (empty: any the CA signed).
        allow: Vec<ServerName<'static>>,
    },
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.role {
            Role::Client { server_name, .. } => f
                .debug_struct("TlsConfig::Client")
                .field("server_name", server_name)
                .finish(),
            Role::Server { .. } => f.write_str("TlsConfig::Server"),
        }
    }
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |problem: String| TlsError::Pem {
        what,
        path: path.display().to_string(),
        problem,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("no certificate in it".into()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        what: "TLS key",
        path: path.display().to_string(),
        problem: e.to_string(),
    })
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs("TLS CA", path)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            what: "TLS CA",
            path: path.display().to_string(),
            problem: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// ring's suites, AES-128-GCM first: on CPUs with AES instructions it
/// is the fastest, and the page data needs no more.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

impl TlsConfig {
    /// The source's settings: present `files.cert`, accept a destination
    /// whose certificate `files.ca` signed and that names `server_name`
    /// (default: the host part of the address dialled).
    pub fn client(files: &TlsFiles<'_>, server_name: Option<&str>) -> Result<Self, TlsError> {
        let server_name = server_name
            .map(|name| {
                ServerName::try_from(name.to_owned())
                    .map_err(|e| TlsError::Config(format!("server name {name:?}: {e}")))
            })
            .transpose()?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots(files.ca)?)
            .with_client_auth_cert(read_certs("TLS certificate", files.cert)?, read_key(files.key)?)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        // The record layer after the handshake is this crate's.
        config.enable_secret_extraction = true;
        Ok(Self {
            role: Role::Client {
                config: Arc::new(config),
                server_name,
            },
        })
    }

    /// The destination's settings: present `files.cert`, and accept only a
    /// source that presents a certificate `files.ca` signed and, when `allow`
    /// names any, valid for one of those names.
    pub fn server(files: &TlsFiles<'_>, allow: &[String]) -> Result<Self, TlsError> {
        let allow = allow
            .iter()
            .map(|name| {
                ServerName::try_from(name.clone())
                    .map_err(|e| TlsError::Config(format!("allowed client {name:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(files.ca)?), provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(read_certs("TLS certificate", files.cert)?, read_key(files.key)?)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        // Migrations do not resume TLS sessions.
        config.send_tls13_tickets = 0;
        config.enable_secret_extraction = true;
        Ok(Self {
            role: Role::Server {
                config: Arc::new(config),
                allow,
            },
        })
    }

    /// Runs the handshake on `stream` (blocking, the whole of it bounded by
    /// the stream's read timeout): the client side for `addr`
    /// (`host:port`), or the server side. Returns the two directions of
    /// the session, which carry the rest of the connection.
    pub(crate) fn handshake(&self, stream: &mut TcpStream, addr: &str) -> io::Result<(Sealer, Opener)> {
        let deadline = stream.read_timeout()?.map(|t| Instant::now() + t);
        let session = match &self.role {
            Role::Client { config, server_name } => {
                let name = match server_name {
                    Some(name) => name.clone(),
                    None => host_name(addr)?,
                };
                let conn = UnbufferedClientConnection::new(Arc::clone(config), name).map_err(io::Error::other)?;
                drive(conn, stream, deadline)?
            }
            Role::Server { config, allow } => {
                // A peer that does not open with a TLS handshake record is
                // not speaking TLS: say so rather than "corrupt message".
                if first_byte(stream)?.is_some_and(|byte| byte != 0x16) {
                    // Tell a plaintext source why, in its own terms.
                    let _ = stream.write_all(&refusal(
                        "this destination requires TLS (--tls-cert, --tls-key, --tls-ca)".into(),
                    ));
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the peer does not speak TLS (plaintext on a TLS listener)",
                    ));
                }
                let conn = UnbufferedServerConnection::new(Arc::clone(config)).map_err(io::Error::other)?;
                let mut session = drive(conn, stream, deadline)?;
                if !allow.is_empty()
                    && let Err(problem) = check_allowed(session.peer.as_ref(), allow)
                {
                    // Tell the source why, inside the session it opened.
                    let _ = session
                        .sealer
                        .seal(&[&refusal(problem.clone())], &mut |records| stream.write_all(records));
                    return Err(io::Error::new(io::ErrorKind::PermissionDenied, problem));
                }
                session
            }
        };
        Ok((session.sealer, session.opener))
    }
}

/// An established session: its two directions and the peer's certificate.
struct Session {
    sealer: Sealer,
    opener: Opener,
    peer: Option<CertificateDer<'static>>,
}

/// A rustls connection driven through its handshake without buffers of
/// its own (client or server).
trait Handshake: Sized {
    type Data;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn state(&self) -> &rustls::CommonState;
    fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Box<dyn NextKeys>), rustls::Error>;
}

macro_rules! handshake_for {
    ($conn:ty, $data:ty) => {
        impl Handshake for $conn {
            type Data = $data;
            fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, $data> {
                self.process_tls_records(incoming)
            }
            fn state(&self) -> &rustls::CommonState {
                self
            }
            fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Box<dyn NextKeys>), rustls::Error> {
                let (secrets, kernel) = self.dangerous_into_kernel_connection()?;
                Ok((secrets, Box::new(kernel)))
            }
        }
    };
}

handshake_for!(UnbufferedClientConnection, rustls::client::ClientConnectionData);
handshake_for!(UnbufferedServerConnection, rustls::server::ServerConnectionData);

/// Runs `conn`'s handshake on `stream` until it is complete and hands the
/// session's keys over to this crate's record layer.
fn drive<H: Handshake>(mut conn: H, stream: &mut TcpStream, deadline: Option<Instant>) -> io::Result<Session> {
    let mut incoming = vec![0u8; 64 << 10];
    let mut used = 0;
    let mut outgoing = Vec::new();
    let mut chunk = Vec::new();
    // Application data that arrived behind the peer's last handshake flight.
    let mut early = Vec::new();
    loop {
        let status = conn.process(&mut incoming[..used]);
        let mut discard = status.discard;
        let (mut read, mut done) = (false, false);
        let state = match status.state {
            Ok(state) => state,
            Err(e) => {
                flush_alert(&mut conn, &mut incoming[..used], stream);
                return Err(handshake_error(e));
            }
        };
        match state {
            ConnectionState::EncodeTlsData(mut data) => {
                let n = match data.encode(&mut chunk) {
                    Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                        chunk.resize(required_size, 0);
                        data.encode(&mut chunk)
                    }
                    other => other,
                }
                .map_err(io::Error::other)?;
                outgoing.extend_from_slice(&chunk[..n]);
            }
            ConnectionState::TransmitTlsData(transmit) => {
                stream.write_all(&outgoing)?;
                outgoing.clear();
                transmit.done();
            }
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(handshake_error)?;
                    discard += record.discard;
                    early.extend_from_slice(record.payload);
                }
            }
            ConnectionState::BlockedHandshake => read = true,
            // A server may send before the client's Finished arrives; the
            // handshake is not complete until it has.
            ConnectionState::WriteTraffic(_) => {
                read = conn.state().is_handshaking();
                done = !read;
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the TLS session during the handshake",
                ));
            }
            other => return Err(io::Error::other(format!("unexpected TLS handshake state {other:?}"))),
        }
        if discard > 0 {
            incoming.copy_within(discard..used, 0);
            used -= discard;
        }
        if done {
            break;
        }
        if read {
            if used == incoming.len() {
                incoming.resize(incoming.len() * 2, 0);
            }
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the TLS handshake took too long",
                    ));
                }
                stream.set_read_timeout(Some(left))?;
            }
            match stream.read(&mut incoming[used..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection during the TLS handshake",
                    ));
                }
                Ok(n) => used += n,
            }
        }
    }
    let peer = conn.state().peer_certificates().and_then(|c| c.first()).cloned();
    let (secrets, keys) = conn.into_kernel().map_err(handshake_error)?;
    let shared = Shared::new(keys);
    let (tx_seq, tx) = &secrets.tx;
    let (rx_seq, rx) = &secrets.rx;
    Ok(Session {
        sealer: Sealer::new(tx, *tx_seq, Arc::clone(&shared))?,
        opener: Opener::new(rx, *rx_seq, shared, &incoming[..used], early)?,
        peer,
    })
}

/// The first byte the peer sent, without taking it (`None`: it closed).
fn first_byte(stream: &TcpStream) -> io::Result<Option<u8>> {
    let mut first = [0u8; 1];
    loop {
        return match stream.peek(&mut first) {
            // io_uring's task work can interrupt a blocking call.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(first[0])),
        };
    }
}

/// Sends the alert a failed handshake left queued, so the peer learns why.
fn flush_alert<H: Handshake>(conn: &mut H, incoming: &mut [u8], stream: &mut TcpStream) {
    let mut chunk = vec![0u8; 1 << 10];
    if let Ok(ConnectionState::EncodeTlsData(mut data)) = conn.process(incoming).state
        && let Ok(n) = data.encode(&mut chunk)
    {
        let _ = stream.write_all(&chunk[..n]);
    }
}

fn handshake_error(e: rustls::Error) -> io::Error {
    match e {
        // In TLS 1.3 a client learns that the server refused its
        // certificate only after its own part of the handshake.
        rustls::Error::AlertReceived(alert) => io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the peer ended the TLS session with {alert:?} (does it trust this side's certificate?)"),
        ),
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

/// Writes a throwaway PKI into `dir` for tests and first tries: `ca.pem`,
/// `server-cert.pem` and `server-key.pem` (valid for `localhost` and
/// `127.0.0.1`), `client-cert.pem` and `client-key.pem` (named
/// `migrate-client`), all signed by a CA whose key is not kept.
pub fn generate_certs(dir: &Path) -> Result<(), TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let err = |e: rcgen::Error| TlsError::Config(format!("generating certificates: {e}"));
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "migrate throwaway CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    let issuer = Issuer::new(ca, &ca_key);
    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| -> Result<(String, String), TlsError> {
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::new(names.clone()).map_err(err)?;
        params.distinguished_name.push(DnType::CommonName, names[0].clone());
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer).map_err(err)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_cert, server_key) = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_cert, client_key) = leaf(vec!["migrate-client".into()], ExtendedKeyUsagePurpose::ClientAuth)?;
    std::fs::create_dir_all(dir).map_err(|e| TlsError::Config(format!("creating {}: {e}", dir.display())))?;
    for (name, text) in [
        ("ca.pem", ca_cert.pem()),
        ("server-cert.pem", server_cert),
        ("server-key.pem", server_key),
        ("client-cert.pem", client_cert),
        ("client-key.pem", client_key),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| TlsError::Config(format!("writing {}: {e}", path.display())))?;
    }
    Ok(())
}

/// The frame that tells a refused source why.
fn refusal(message: String) -> Vec<u8> {
    let mut frame = Vec::new();
    migration_wire::Message::Error(migration_wire::PeerError {
        code: migration_wire::ErrorCode::Protocol,
        message,
    })
    .encode(&mut frame);
    frame
}

/// Whether the client's certificate is valid for one of `allow`.
fn check_allowed(cert: Option<&CertificateDer<'_>>, allow: &[ServerName<'static>]) -> Result<(), String> {
    let Some(cert) = cert else {
        return Err("the source presented no certificate".into());
    };
    let cert = webpki::EndEntityCert::try_from(cert).map_err(|e| format!("the source's certificate: {e}"))?;
    if allow
        .iter()
        .any(|name| cert.verify_is_valid_for_subject_name(name).is_ok())
    {
        return Ok(());
    }
    let names: Vec<String> = allow.iter().map(|n| n.to_str().into_owned()).collect();
    Err(format!(
        "the source's certificate names none of the identities this destination allows ({})",
        names.join(", ")
    ))
}

/// The server name in `host:port` (an IP address or a DNS name).
fn host_name(addr: &str) -> io::Result<ServerName<'static>> {
    let host = match addr.rsplit_once(':') {
        Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    ServerName::try_from(host.to_owned()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{host:?} is not a name TLS can check ({e}); give --tls-server-name"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_come_from_the_address() {
        assert_eq!(
            host_name("127.0.0.1:4444").unwrap(),
            ServerName::try_from("127.0.0.1").unwrap()
        );
        assert_eq!(host_name("[::1]:4444").unwrap(), ServerName::try_from("::1").unwrap());
        assert_eq!(
            host_name("dest.example:1").unwrap(),
            ServerName::try_from("dest.example").unwrap()
        );
    }
}
