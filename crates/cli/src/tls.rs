//! TLS options shared by `send` and `recv`, and `gen-certs`.

use anyhow::{Context, Result};
use std::path::PathBuf;
use transport_tcp::{TlsConfig, TlsFiles};

/// TLS 1.3 with mutual authentication: this side's certificate and key,
/// and the CA both sides' certificates come from.
#[derive(Debug, clap::Args)]
pub struct TlsArgs {
    /// This side's certificate (PEM); turns TLS on (with --tls-key and --tls-ca).
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// This side's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA that signed the peer's certificate (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    fn files(&self) -> Option<TlsFiles<'_>> {
        Some(TlsFiles {
            cert: self.tls_cert.as_deref()?,
            key: self.tls_key.as_deref()?,
            ca: self.tls_ca.as_deref()?,
        })
    }

    /// The source's settings, if TLS is on.
    pub fn client(&self, server_name: Option<&str>) -> Result<Option<TlsConfig>> {
        self.files()
            .map(|files| TlsConfig::client(&files, server_name))
            .transpose()
            .context("TLS settings")
    }

    /// The destination's settings, if TLS is on, accepting the client
    /// identities in `allow` (any the CA signed when empty).
    pub fn server(&self, allow: &[String]) -> Result<Option<TlsConfig>> {
        self.files()
            .map(|files| TlsConfig::server(&files, allow))
            .transpose()
            .context("TLS settings")
    }
}

#[derive(Debug, clap::Args)]
pub struct GenCertsArgs {
    /// Where to write ca.pem, server-cert.pem, server-key.pem,
    /// client-cert.pem and client-key.pem.
    pub dir: PathBuf,
}

/// Writes a throwaway CA, server and client certificates.
pub fn gen_certs(args: GenCertsArgs) -> u8 {
    match transport_tcp::generate_certs(&args.dir) {
        Ok(()) => {
            eprintln!(
                "gen-certs: wrote ca.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem to {} \
                 (the server certificate is valid for localhost and 127.0.0.1; for tests and first tries only)",
                args.dir.display()
            );
            crate::exit::OK
        }
        Err(err) => {
            eprintln!("gen-certs: {err}");
            crate::exit::FAILED
        }
    }
}
