//! TLS 1.3 with mutual authentication on every connection (rustls, the
//! `ring` provider).
//!
//! Both sides present a certificate from the same CA: the destination (the
//! TLS server) refuses a source without one or with one from another CA,
//! the source refuses a destination whose certificate does not name the
//! address it dialled (or `--tls-server-name`). A connection's two halves
//! share one rustls session: the sending half encrypts under its lock and
//! is the only one to write to the socket, so records leave in order; the
//! receiving half reads ciphertext from the socket without the lock and
//! takes the lock only to decrypt.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

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
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots(files.ca)?)
            .with_client_auth_cert(read_certs("TLS certificate", files.cert)?, read_key(files.key)?)
            .map_err(|e| TlsError::Config(e.to_string()))?;
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
        Ok(Self {
            role: Role::Server {
                config: Arc::new(config),
                allow,
            },
        })
    }

    /// Runs the handshake on `stream` (blocking, bounded by the stream's
    /// timeouts): the client side for `addr` (`host:port`), or the server
    /// side. The session it returns carries the rest of the connection.
    pub(crate) fn handshake(&self, stream: &mut TcpStream, addr: &str) -> io::Result<Arc<Mutex<Connection>>> {
        let mut conn: Connection = match &self.role {
            Role::Client { config, server_name } => {
                let name = match server_name {
                    Some(name) => name.clone(),
                    None => host_name(addr)?,
                };
                ClientConnection::new(Arc::clone(config), name)
                    .map_err(io::Error::other)?
                    .into()
            }
            Role::Server { config, .. } => {
                // A peer that does not open with a TLS handshake record is
                // not speaking TLS: say so rather than "corrupt message".
                let mut first = [0u8; 1];
                if stream.peek(&mut first)? == 1 && first[0] != 0x16 {
                    // Tell a plaintext source why, in its own terms.
                    let _ = stream.write_all(&refusal(
                        "this destination requires TLS (--tls-cert, --tls-key, --tls-ca)".into(),
                    ));
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the peer does not speak TLS (plaintext on a TLS listener)",
                    ));
                }
                ServerConnection::new(Arc::clone(config))
                    .map_err(io::Error::other)?
                    .into()
            }
        };
        // The whole handshake is bounded, not just each read: a peer that
        // trickles bytes cannot hold the listener.
        let deadline = stream.read_timeout()?.map(|t| std::time::Instant::now() + t);
        while conn.is_handshaking() {
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the TLS handshake took too long",
                    ));
                }
                stream.set_read_timeout(Some(left))?;
            }
            conn.complete_io(stream)?;
        }
        // Flush what the handshake left to send (the client's Finished).
        while conn.wants_write() {
            conn.write_tls(stream)?;
        }
        if let Role::Server { allow, .. } = &self.role
            && !allow.is_empty()
            && let Err(problem) = check_allowed(&conn, allow)
        {
            // Tell the source why, inside the session it opened.
            let _ = conn.writer().write_all(&refusal(problem.clone()));
            while conn.wants_write() && conn.write_tls(stream).is_ok() {}
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, problem));
        }
        // A whole page batch is encrypted at once; the sending half drains
        // it right away.
        conn.set_buffer_limit(None);
        Ok(Arc::new(Mutex::new(conn)))
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
fn check_allowed(conn: &Connection, allow: &[ServerName<'static>]) -> Result<(), String> {
    let Some(cert) = conn.peer_certificates().and_then(|c| c.first()) else {
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

/// The sending state of a TLS connection half.
#[derive(Debug)]
pub(crate) struct TlsTx {
    pub(crate) session: Arc<Mutex<Connection>>,
    /// Records of the slice being sent.
    out: Vec<u8>,
}

impl TlsTx {
    pub(crate) fn new(session: Arc<Mutex<Connection>>) -> Self {
        Self {
            session,
            out: Vec::new(),
        }
    }

    /// Sends the close-notify alert that ends the session.
    pub(crate) fn close(&mut self, socket: &mut dyn Write) -> io::Result<()> {
        let mut conn = self.session.lock().unwrap_or_else(|e| e.into_inner());
        conn.send_close_notify();
        while conn.wants_write() {
            conn.write_tls(socket)?;
        }
        Ok(())
    }

    /// Encrypts `parts` (and anything the session owes the peer) and
    /// writes the records to `socket`, in order, a slice at a time. The
    /// records are taken out under the session's lock and written with it
    /// released: this half is the only writer, so they leave in order, and
    /// the receiving half never waits for a socket write to finish.
    pub(crate) fn seal(&mut self, parts: &[&[u8]], socket: &mut dyn Write) -> io::Result<u64> {
        const SLICE: usize = 64 << 10;
        let mut sent = 0;
        for part in parts {
            for slice in part.chunks(SLICE) {
                self.out.clear();
                {
                    let mut conn = self.session.lock().unwrap_or_else(|e| e.into_inner());
                    conn.writer().write_all(slice)?;
                    while conn.wants_write() {
                        conn.write_tls(&mut self.out)?;
                    }
                }
                socket.write_all(&self.out)?;
                sent += self.out.len() as u64;
            }
        }
        Ok(sent)
    }
}

/// The receiving state of a TLS connection half.
#[derive(Debug)]
pub(crate) struct TlsRx {
    session: Arc<Mutex<Connection>>,
    /// Ciphertext read from the socket and not fed to the session yet.
    sealed: Vec<u8>,
    start: usize,
    end: usize,
    received: u64,
}

impl TlsRx {
    pub(crate) fn new(session: Arc<Mutex<Connection>>) -> Self {
        Self {
            session,
            sealed: vec![0; 256 << 10],
            start: 0,
            end: 0,
            received: 0,
        }
    }

    /// Reads plaintext into `buf`; `fill` reads ciphertext from the socket
    /// (without the session's lock held, so waiting never blocks the
    /// sending half). 0 means the peer closed.
    pub(crate) fn read(
        &mut self,
        buf: &mut [u8],
        mut fill: impl FnMut(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        loop {
            {
                let mut conn = self.session.lock().unwrap_or_else(|e| e.into_inner());
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                // No plaintext: feed what ciphertext is here.
                if self.start < self.end {
                    let mut sealed = &self.sealed[self.start..self.end];
                    let fed = conn.read_tls(&mut sealed)?;
                    self.start += fed;
                    conn.process_new_packets().map_err(|e| match e {
                        // In TLS 1.3 a client learns that the server refused
                        // its certificate only here, after its handshake.
                        rustls::Error::AlertReceived(alert) => io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "the peer ended the TLS session with {alert:?} (does it trust this side's certificate?)"
                            ),
                        ),
                        other => io::Error::new(io::ErrorKind::InvalidData, other),
                    })?;
                    continue;
                }
            }
            let n = fill(&mut self.sealed)?;
            if n == 0 {
                // End of the TCP stream: let the session judge it, so a
                // close without close-notify (a truncation) is an error.
                let mut conn = self.session.lock().unwrap_or_else(|e| e.into_inner());
                conn.read_tls(&mut &[][..])?;
                conn.process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                return conn.reader().read(buf);
            }
            self.received += n as u64;
            self.start = 0;
            self.end = n;
        }
    }

    /// Ciphertext bytes read so far.
    pub(crate) fn received(&self) -> u64 {
        self.received
    }
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
