//! The join endpoints: `/ca.crt` and `/edge.crt` (a join token or a node certificate in, a
//! node certificate out), rate-limited, each issue recorded against its token.

use super::*;

/// A token bucket and a log limiter for the join endpoint: a flood of join requests can
/// neither exhaust the CA's signing (`HubConfig::joins_per_second` on average, bursts of twice
/// that) nor fill the log (refusal warnings at most once a second, the rest counted in the next).
pub(super) struct JoinGate {
    per_second: f64,
    tokens: f64,
    last: Instant,
    last_warn: Option<Instant>,
    suppressed: u64,
}

impl JoinGate {
    /// A full bucket: a burst of two seconds' joins, and at least one (under 0.5/s a bucket of
    /// two seconds would never hold a whole join). `per_second` must be positive and finite
    /// ([`check_rate`]).
    pub(super) fn new(per_second: f64) -> JoinGate {
        JoinGate {
            per_second,
            tokens: Self::burst(per_second),
            last: Instant::now(),
            last_warn: None,
            suppressed: 0,
        }
    }

    fn burst(per_second: f64) -> f64 {
        (per_second * 2.0).max(1.0)
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let burst = Self::burst(self.per_second);
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_second)
            .min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// `Some(suppressed since the last warning)` when a warning may be logged now.
    fn warn(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last_warn
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return None;
        }
        self.last_warn = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// `joins_per_second` as the gate needs it: a positive, finite number (at least one join
/// every 1,000 s, so a typo such as `0.0` does not shut the endpoint for good).
pub(super) fn check_rate(per_second: f64) -> Result<f64, TunnelError> {
    if per_second.is_finite() && per_second >= 0.001 {
        Ok(per_second)
    } else {
        Err(TunnelError::Config(format!(
            "joins_per_second {per_second}: must be a number of at least 0.001"
        )))
    }
}

pub(super) async fn sign(
    inner: Arc<Inner>,
    peer: Option<Result<Peer, String>>,
    remote: SocketAddr,
    req: Request<Body>,
) -> Response<Full<Bytes>> {
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let node = header("nodename").unwrap_or_default();
    let bearer =
        header("authorization").and_then(|a| a.strip_prefix("Bearer ").map(str::to_string));
    let refuse = |status: StatusCode, why: String| {
        let warn = inner
            .join_gate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .warn();
        if let Some(suppressed) = warn {
            tracing::warn!(%remote, node = %node, reason = %why, suppressed, "certificate request refused");
        }
        text(status, why)
    };
    if !inner
        .join_gate
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .allow()
    {
        Counters::inc(&inner.counters.joins_throttled);
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many certificate requests (more than {}/s); retry in a second",
                inner.cfg.joins_per_second
            ),
        );
    }
    if !tls::valid_node_name(&node) {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("NodeName header {node:?} is not a valid node name (lower-case DNS name)"),
        );
    }
    // Renewal over mTLS needs the current certificate for the same node; otherwise a token
    // that admits this name (single use, never a connected or registered name unless bound to
    // it). `token` is what the new certificate is recorded under, so that revoking the token
    // revokes it too.
    let connected = inner.known(&node).is_some_and(|n| n.session().is_some());
    let (how, token, rejoin) = match (&peer, &bearer) {
        (Some(Ok(current)), _) if current.node == node => {
            let tokens = inner.tokens.clone();
            let der = current.der.clone();
            let token = tokio::task::spawn_blocking(move || tokens.token_of_cert(&der))
                .await
                .ok()
                .flatten()
                .unwrap_or_default();
            ("renewal".to_string(), token, false)
        }
        (_, Some(token)) => {
            let tokens = inner.tokens.clone();
            let (t, n) = (token.clone(), node.clone());
            match tokio::task::spawn_blocking(move || tokens.admit(&t, &n, connected)).await {
                Ok(Ok(a)) => (format!("token {}", a.token), a.token, a.rejoin),
                Ok(Err(e)) if e.is_conflict() => {
                    return refuse(StatusCode::CONFLICT, e.to_string());
                }
                Ok(Err(e @ TokenError::BoundElsewhere { .. })) => {
                    return refuse(StatusCode::FORBIDDEN, e.to_string());
                }
                Ok(Err(e @ TokenError::Unavailable(_))) => {
                    return refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
                }
                Ok(Err(e)) => return refuse(StatusCode::UNAUTHORIZED, e.to_string()),
                Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        (Some(Ok(current)), None) => {
            return refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "the client certificate is for node {}, not {node}; a node may only renew its own certificate",
                    current.node
                ),
            );
        }
        _ => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "a join token (Authorization: Bearer <token>) or the node's current certificate is required".into(),
            );
        }
    };
    let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("reading the CSR: {e}")),
    };
    let csr = String::from_utf8_lossy(&body);
    let issued = inner.node_ca.sign_csr(
        &csr,
        &sedge_pki::IssueRequest {
            common_name: format!("{}{node}", tls::NODE_PREFIX),
            organizations: vec![tls::NODES_GROUP.into()],
            sans: Vec::new(),
            usage: sedge_pki::Usage::Client,
            valid_for: Duration::from_secs(inner.cfg.node_cert_days.max(1) * 24 * 3600),
        },
    );
    match issued {
        Ok(i) => {
            let recorded = record_issued(&inner, &i.cert_pem, &node, &token, rejoin).await;
            if let Err(e) = recorded {
                return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
            }
            Counters::inc(&inner.counters.certificates_issued);
            tracing::info!(%remote, %node, via = %how, rejoin, "issued node certificate");
            text(StatusCode::OK, i.cert_pem)
        }
        Err(e) => refuse(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// Records an issued certificate; a re-join first revokes the node's earlier certificates and
/// closes the session they hold.
pub(super) async fn record_issued(
    inner: &Arc<Inner>,
    cert_pem: &str,
    node: &str,
    token: &str,
    rejoin: bool,
) -> Result<(), TunnelError> {
    let der = sedge_pki::certs_from_pem(cert_pem, "issued certificate")?
        .into_iter()
        .next()
        .ok_or_else(|| TunnelError::Tls("the issued certificate is empty".into()))?;
    let (_, not_after) = sedge_pki::validity(&der)?;
    let tokens = inner.tokens.clone();
    let (n, t) = (node.to_string(), token.to_string());
    tokio::task::spawn_blocking(move || {
        if rejoin {
            tokens.revoke_node(&n)?;
        }
        tokens.record_cert(&der, &n, &t, not_after)
    })
    .await
    .map_err(|e| TunnelError::Store(e.to_string()))??;
    if rejoin {
        inner.close_session(node);
    }
    Ok(())
}
