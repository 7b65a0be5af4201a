//! TLS for the channel: the hub's serving configuration, node identities in client
//! certificates, the edge's client configuration, and trust-on-first-use pinned by hash for join.
//!
//! Nodes are `CN=system:node:<name>, O=system:nodes`, as in Kubernetes and KubeEdge. All keys are
//! ECDSA P-256; TLS 1.3 is preferred and TLS 1.2 allowed on the TCP port (QUIC is 1.3 only).

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::TunnelError;

/// ALPN protocol on QUIC.
pub const ALPN_QUIC: &[u8] = b"sedge-tunnel/1";
/// The prefix of node user names.
pub const NODE_PREFIX: &str = "system:node:";
/// The group of node certificates.
pub const NODES_GROUP: &str = "system:nodes";

/// The node CA: it signs node certificates, and the hub accepts only its certificates from
/// nodes. It lives in `<pki_dir>/nodes/` apart from the cluster CA, so that a node's
/// certificate is never a client certificate the API server accepts (the API server trusts
/// only the cluster CA).
pub fn node_ca(pki_dir: &std::path::Path) -> Result<sedge_pki::Ca, TunnelError> {
    let dir = pki_dir.join("nodes");
    std::fs::create_dir_all(&dir)
        .map_err(|e| TunnelError::Config(format!("{}: {e}", dir.display())))?;
    Ok(sedge_pki::Ca::load_or_create(&dir, "sedge-node-ca")?)
}

/// Lower-case hex SHA-256 of a certificate's DER: the first part of a join token.
pub fn ca_hash(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The node named by a verified client certificate, or why it does not name one.
pub fn node_of_cert(der: &[u8]) -> Result<String, String> {
    let (cn, orgs, _) = sedge_pki::identity(der).map_err(|e| e.to_string())?;
    let Some(name) = cn.strip_prefix(NODE_PREFIX) else {
        return Err(format!(
            "client certificate is for {cn:?}, not a node (expected CN={NODE_PREFIX}<name>)"
        ));
    };
    if !orgs.iter().any(|o| o == NODES_GROUP) {
        return Err(format!(
            "client certificate for {cn:?} lacks O={NODES_GROUP}"
        ));
    }
    if !valid_node_name(name) {
        return Err(format!("client certificate names an invalid node {name:?}"));
    }
    Ok(name.to_string())
}

/// Whether `name` is a valid node name (a DNS-1123 subdomain).
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// The hub's TCP (WebSocket + join) config: a client certificate is optional at the TLS layer
/// (joining nodes have none yet) and required by the tunnel endpoint. HTTP/1.1 only, since the
/// WebSocket upgrade is an HTTP/1.1 mechanism.
pub fn hub_tcp_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<rustls::ServerConfig, TunnelError> {
    let mut cfg = sedge_pki::server_config(cert_pem, key_pem, Some(ca_pem), false)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The hub's QUIC config: client certificate required (QUIC itself negotiates TLS 1.3 only).
pub fn hub_quic_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<rustls::ServerConfig, TunnelError> {
    let mut cfg = sedge_pki::server_config(cert_pem, key_pem, Some(ca_pem), true)?;
    cfg.alpn_protocols = vec![ALPN_QUIC.to_vec()];
    Ok(cfg)
}

/// An edge's client config: trusts only the cluster CA, presents the node certificate when
/// given one.
pub fn edge_client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    quic: bool,
) -> Result<rustls::ClientConfig, TunnelError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in sedge_pki::certs_from_pem(ca_pem, "cluster CA")? {
        roots.add(c).map_err(sedge_pki::PkiError::from)?;
    }
    let b = rustls::ClientConfig::builder_with_provider(sedge_pki::provider());
    let b = if quic {
        b.with_protocol_versions(&[&rustls::version::TLS13])
    } else {
        b.with_safe_default_protocol_versions()
    }
    .map_err(sedge_pki::PkiError::from)?
    .with_root_certificates(roots);
    let mut cfg = match identity {
        Some((cert, key)) => b
            .with_client_auth_cert(
                sedge_pki::certs_from_pem(cert, "node certificate")?,
                sedge_pki::key_from_pem(key, "node key")?,
            )
            .map_err(sedge_pki::PkiError::from)?,
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![if quic {
        ALPN_QUIC.to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    Ok(cfg)
}

/// Accepts whatever certificate the server presents (checking only that the server holds its
/// key) and remembers it, so that after the CA has been fetched and pinned by hash the server
/// certificate can be verified against it. Used only to fetch `/ca.crt` during join.
#[derive(Debug)]
pub struct CaptureVerifier {
    seen: Mutex<Option<(CertificateDer<'static>, Vec<CertificateDer<'static>>)>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl CaptureVerifier {
    /// A new verifier.
    pub fn new() -> Arc<CaptureVerifier> {
        Arc::new(CaptureVerifier {
            seen: Mutex::new(None),
            provider: sedge_pki::provider(),
        })
    }

    /// Verifies the captured server certificate against `ca_pem` for `host`.
    pub fn verify_against(&self, ca_pem: &str, host: &str) -> Result<(), TunnelError> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some((end, inter)) = seen else {
            return Err(TunnelError::Tls("no server certificate was seen".into()));
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in sedge_pki::certs_from_pem(ca_pem, "cluster CA")? {
            roots.add(c).map_err(sedge_pki::PkiError::from)?;
        }
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| TunnelError::Tls(e.to_string()))?;
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| TunnelError::Tls(format!("server name {host:?}: {e}")))?;
        v.verify_server_cert(&end, &inter, &name, &[], UnixTime::now())
            .map_err(|e| {
                TunnelError::Tls(format!(
                    "the hub's certificate does not verify against the pinned CA: {e}"
                ))
            })?;
        Ok(())
    }

    /// A client config using this verifier.
    pub fn client_config(self: &Arc<Self>) -> Result<rustls::ClientConfig, TunnelError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(sedge_pki::PkiError::from)?
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(cfg)
    }
}

impl ServerCertVerifier for CaptureVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some((
            end_entity.clone().into_owned(),
            intermediates
                .iter()
                .map(|c| c.clone().into_owned())
                .collect(),
        ));
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_follow_dns_rules() {
        assert!(valid_node_name("edge-1"));
        assert!(valid_node_name("edge-1.site-a"));
        assert!(!valid_node_name("Edge"));
        assert!(!valid_node_name("-edge"));
        assert!(!valid_node_name(""));
        assert!(!valid_node_name("a/b"));
    }

    #[test]
    fn node_identity_needs_prefix_and_group() {
        let dir = tempfile::tempdir().unwrap();
        let ca = sedge_pki::Ca::load_or_create(dir.path(), "ca").unwrap();
        let issue = |cn: &str, orgs: &[&str]| {
            let i = ca
                .issue(&sedge_pki::IssueRequest {
                    common_name: cn.into(),
                    organizations: orgs.iter().map(|s| s.to_string()).collect(),
                    sans: vec![],
                    usage: sedge_pki::Usage::Client,
                    valid_for: std::time::Duration::from_secs(60),
                })
                .unwrap();
            sedge_pki::certs_from_pem(&i.cert_pem, "c").unwrap()[0].clone()
        };
        assert_eq!(
            node_of_cert(&issue("system:node:edge-1", &[NODES_GROUP])).unwrap(),
            "edge-1"
        );
        let e = node_of_cert(&issue("admin", &["system:masters"])).unwrap_err();
        assert!(e.contains("not a node"), "{e}");
        let e = node_of_cert(&issue("system:node:edge-1", &[])).unwrap_err();
        assert!(e.contains("lacks O=system:nodes"), "{e}");
    }
}
