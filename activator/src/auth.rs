//! Who may read the stats stream: only the operator. It sends a projected
//! ServiceAccount token made for the activators' audience; the activator asks the API
//! server whose it is (TokenReview) and keeps a positive answer for a few minutes.
//!
//! Owns: the Bearer check of `/v1/stats`. Must not touch: the data path, the other admin
//! routes (`/livez`, `/readyz` stay open for the kubelet; `/metrics` for Prometheus).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use http::{HeaderMap, Response, StatusCode, header};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use parking_lot::Mutex;
use snooze_runtime::admin::{Body, text};
use tracing::{info, warn};

/// How long a reviewed token is trusted without asking again.
const TRUST_FOR: Duration = Duration::from_secs(300);
/// Tokens remembered at most (one per operator replica, rotated hourly: a handful).
const MAX_REMEMBERED: usize = 64;

pub struct StatsAuth {
    client: Client,
    /// The audience the operator's token is made for.
    pub audience: String,
    /// The one user allowed: the operator's ServiceAccount
    /// (`system:serviceaccount:<namespace>:<name>`).
    pub reader: String,
    trusted: Mutex<HashMap<String, Instant>>,
}

/// The token of an `Authorization: Bearer …` header.
pub fn bearer(h: &HeaderMap) -> Option<String> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty())
        .then(|| token.trim().to_string())
}

impl StatsAuth {
    pub fn new(client: Client, audience: String, reader: String) -> Self {
        info!(%audience, %reader, "the stats stream is for the operator's ServiceAccount only");
        Self {
            client,
            audience,
            reader,
            trusted: Mutex::new(HashMap::new()),
        }
    }

    /// Ok when `token` is the operator's; otherwise the answer to send: 401 without a
    /// token, 403 for anyone else's, 503 when the API server cannot tell (not cached).
    pub async fn check(&self, token: Option<String>) -> Result<(), Response<Body>> {
        let Some(token) = token else {
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "snooze: the stats stream needs the operator's token (Authorization: Bearer)\n",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            return Err(r);
        };
        if let Some(at) = self.trusted.lock().get(&token)
            && at.elapsed() < TRUST_FOR
        {
            return Ok(());
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.clone()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            api.create(&PostParams::default(), &review),
        )
        .await;
        let status = match answer {
            Ok(Ok(r)) => r.status.unwrap_or_default(),
            Ok(Err(e)) => {
                warn!("stats stream: TokenReview failed: {e}");
                return Err(unavailable());
            }
            Err(_) => {
                warn!("stats stream: TokenReview timed out");
                return Err(unavailable());
            }
        };
        let user = status
            .user
            .as_ref()
            .and_then(|u| u.username.as_deref())
            .unwrap_or("");
        let for_us = status
            .audiences
            .as_ref()
            .is_some_and(|a| a.contains(&self.audience));
        if status.authenticated == Some(true) && for_us && user == self.reader {
            let mut t = self.trusted.lock();
            t.retain(|_, at| at.elapsed() < TRUST_FOR);
            if t.len() >= MAX_REMEMBERED {
                t.clear();
            }
            t.insert(token, Instant::now());
            return Ok(());
        }
        warn!(user, "stats stream refused: not the operator's token");
        Err(text(
            StatusCode::FORBIDDEN,
            format!("snooze: only {} may read the stats stream\n", self.reader),
        ))
    }
}

fn unavailable() -> Response<Body> {
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        "snooze: cannot verify the token now; retry\n",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::AUTHORIZATION, v.parse().unwrap());
            m
        };
        assert_eq!(bearer(&h("Bearer abc")).as_deref(), Some("abc"));
        assert_eq!(bearer(&h("bearer  abc ")).as_deref(), Some("abc"));
        assert_eq!(bearer(&h("Basic abc")), None);
        assert_eq!(bearer(&h("Bearer ")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }
}
