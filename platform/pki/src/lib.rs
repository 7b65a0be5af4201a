//! Sedge's certificate authority.
//!
//! One CA per cloud (ECDSA P-256, created on first start, kept in a directory with the key at mode
//! 0600) issues the API server's serving certificate, admin client certificates for kubeconfigs,
//! and (through CSRs) edge node certificates. Identities in client certificates follow Kubernetes:
//! the subject CN is the user, the O entries are the groups.
//!
//! All cryptography comes from `rcgen`, `rustls` (ring) and `x509-parser`; nothing is hand-rolled.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// PKI failures.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Reading or writing key material failed.
    #[error("{path}: {source}")]
    Io {
        /// File involved.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// rcgen refused (bad SAN, bad key, bad CSR).
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A PEM or DER blob did not parse.
    #[error("{what} is not valid: {why}")]
    Parse {
        /// What was being parsed.
        what: String,
        /// Parser message.
        why: String,
    },
    /// rustls refused the material.
    #[error("TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a file, with mode 0600 when it holds a private key.
pub fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(contents.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// TLS server.
    Server,
    /// TLS client.
    Client,
    /// Both (e.g. a node that serves and dials).
    Both,
}

/// A certificate to issue.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// Subject CN (the user name for client certificates).
    pub common_name: String,
    /// Subject O entries (groups).
    pub organizations: Vec<String>,
    /// DNS names and IP addresses.
    pub sans: Vec<String>,
    /// Key usage.
    pub usage: Usage,
    /// Validity from now.
    pub valid_for: Duration,
}

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Certificate PEM.
    pub cert_pem: String,
    /// PKCS#8 private key PEM (empty when issued from a CSR).
    pub key_pem: String,
}

/// The certificate authority.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn to_time(d: Duration) -> time::Duration {
    time::Duration::seconds(d.as_secs().min(i64::MAX as u64) as i64)
}

fn usages(params: &mut CertificateParams, usage: Usage) {
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = match usage {
        Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
        Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        Usage::Both => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    };
    params.use_authority_key_identifier_extension = true;
}

impl Ca {
    /// Loads `ca.crt`/`ca.key` from `dir`, or creates them (valid 10 years) if absent.
    pub fn load_or_create(dir: &Path, common_name: &str) -> Result<Ca, PkiError> {
        let cert_path = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        if cert_path.exists() && key_path.exists() {
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Parse {
                what: key_path.display().to_string(),
                why: e.to_string(),
            })?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| PkiError::Parse {
                what: cert_path.display().to_string(),
                why: e.to_string(),
            })?;
            return Ok(Ca { cert_pem, issuer });
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "sedge");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now() - time::Duration::hours(1);
        params.not_after = now() + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        write_file(&key_path, &key.serialize_pem(), true)?;
        write_file(&cert_path, &cert_pem, false)?;
        tracing::info!(dir = %dir.display(), "created a new certificate authority");
        Ok(Ca {
            cert_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> Result<CertificateDer<'static>, PkiError> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map_err(|e| PkiError::Parse {
            what: "CA certificate".into(),
            why: e.to_string(),
        })
    }

    fn params(&self, req: &IssueRequest) -> Result<CertificateParams, PkiError> {
        let mut params = CertificateParams::new(req.sans.clone())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, req.common_name.as_str());
        for o in &req.organizations {
            dn.push(DnType::OrganizationName, o.as_str());
        }
        params.distinguished_name = dn;
        usages(&mut params, req.usage);
        params.not_before = now() - time::Duration::minutes(5);
        params.not_after = now() + to_time(req.valid_for);
        Ok(params)
    }

    /// Issues a certificate with a fresh P-256 key.
    pub fn issue(&self, req: &IssueRequest) -> Result<Issued, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = self.params(req)?.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a PEM CSR. The subject and SANs come from `req`, not from the CSR, so a requester
    /// cannot name itself: only its public key is taken.
    pub fn sign_csr(&self, csr_pem: &str, req: &IssueRequest) -> Result<Issued, PkiError> {
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| PkiError::Parse {
                what: "certificate signing request".into(),
                why: e.to_string(),
            })?;
        let cert = self.params(req)?.signed_by(&csr.public_key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: String::new(),
        })
    }
}

/// Makes a CSR (PEM) and its private key (PEM) for `common_name`.
pub fn make_csr(common_name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    let pem = csr.pem().map_err(|e| PkiError::Parse {
        what: "CSR".into(),
        why: e.to_string(),
    })?;
    Ok((pem, key.serialize_pem()))
}

/// The identity in a client certificate: (CN, O entries), and its expiry as Unix seconds.
pub fn identity(der: &[u8]) -> Result<(String, Vec<String>, i64), PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse {
        what: "client certificate".into(),
        why: e.to_string(),
    })?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .unwrap_or_default()
        .to_string();
    let orgs = subject
        .iter_organization()
        .filter_map(|a| a.as_str().ok().map(String::from))
        .collect();
    Ok((cn, orgs, cert.validity().not_after.timestamp()))
}

/// A certificate's validity window as Unix seconds: (not before, not after).
pub fn validity(der: &[u8]) -> Result<(i64, i64), PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse {
        what: "certificate".into(),
        why: e.to_string(),
    })?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// Parses a PEM certificate chain.
pub fn certs_from_pem(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| PkiError::Parse {
        what: what.into(),
        why: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(PkiError::Parse {
            what: what.into(),
            why: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// Parses a PEM private key.
pub fn key_from_pem(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Parse {
        what: what.into(),
        why: e.to_string(),
    })
}

/// The crypto provider used everywhere (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls server config presenting `cert_pem`/`key_pem`. With `client_ca_pem`, client
/// certificates signed by that CA are verified; `require_client_cert` decides whether a client
/// without one may still connect (e.g. to present a bearer token). ALPN offers h2 and http/1.1.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    client_ca_pem: Option<&str>,
    require_client_cert: bool,
) -> Result<rustls::ServerConfig, PkiError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca_pem {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs_from_pem(ca, "client CA")? {
                roots.add(c)?;
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            );
            let v = if require_client_cert {
                v
            } else {
                v.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(v.build().map_err(|e| PkiError::Parse {
                what: "client CA".into(),
                why: e.to_string(),
            })?)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(
        certs_from_pem(cert_pem, "server certificate")?,
        key_from_pem(key_pem, "server key")?,
    )?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cn: &str, usage: Usage) -> IssueRequest {
        IssueRequest {
            common_name: cn.into(),
            organizations: vec!["system:masters".into()],
            sans: vec!["localhost".into(), "127.0.0.1".into()],
            usage,
            valid_for: Duration::from_secs(3600),
        }
    }

    #[test]
    fn ca_persists_and_issues_verifiable_identities() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "sedge-ca").unwrap();
        let again = Ca::load_or_create(dir.path(), "sedge-ca").unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem());
        let issued = again.issue(&req("admin", Usage::Client)).unwrap();
        let der = certs_from_pem(&issued.cert_pem, "cert").unwrap();
        let (cn, orgs, _) = identity(&der[0]).unwrap();
        assert_eq!(cn, "admin");
        assert_eq!(orgs, vec!["system:masters"]);
        // A server config builds from what we issue.
        let server = ca.issue(&req("server", Usage::Server)).unwrap();
        server_config(
            &server.cert_pem,
            &server.key_pem,
            Some(ca.cert_pem()),
            false,
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn csr_subject_comes_from_the_signer() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "sedge-ca").unwrap();
        let (csr, _key) = make_csr("system:node:evil").unwrap();
        let issued = ca
            .sign_csr(&csr, &req("system:node:edge-1", Usage::Client))
            .unwrap();
        let der = certs_from_pem(&issued.cert_pem, "cert").unwrap();
        assert_eq!(identity(&der[0]).unwrap().0, "system:node:edge-1");
        assert!(ca.sign_csr("garbage", &req("x", Usage::Client)).is_err());
    }

    #[test]
    fn bad_pem_is_named() {
        let e = certs_from_pem("nope", "server certificate").unwrap_err();
        assert!(e.to_string().contains("server certificate"), "{e}");
    }
}
