//! Who may read an admin route: a Bearer token made for our audience, whose owner the API
//! server names (TokenReview) and, for `/metrics`, may `get` that path (a
//! SubjectAccessReview of a non-resource URL, the `nonResourceURLs` rule of a ClusterRole:
//! the convention of controller-runtime's metrics filter and kube-rbac-proxy).
//!
//! The token must be made for our audience (a projected ServiceAccount token), so one
//! seen on the wire — the admin port speaks plain HTTP — is of no use against the API
//! server or anything else. Answers are kept for a while (allowed 5 min, refused 10 s),
//! at most [`MAX_REMEMBERED`] tokens, and at most [`MAX_REVIEWS`] reviews are in flight
//! at once: a flood of made-up tokens costs the API server a bounded number of calls.
//!
//! Owns: the Bearer checks of the admin server. Must not touch: the data path, `/livez`
//! and `/readyz` (open for the kubelet).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::admin::{Body, text};

/// How long an allowed token is trusted without asking again.
const TRUST_FOR: Duration = Duration::from_secs(300);
/// How long a refused token is refused without asking again.
const REFUSE_FOR: Duration = Duration::from_secs(10);
/// Tokens remembered at most (the allowed readers are a handful; the rest is noise).
pub const MAX_REMEMBERED: usize = 256;
/// Reviews in flight at most; more at once get 503 and retry.
pub const MAX_REVIEWS: usize = 8;
/// How long one review may take.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Who is allowed.
#[derive(Debug, Clone)]
pub enum Allowed {
    /// Exactly this user (`system:serviceaccount:<namespace>:<name>`).
    User(String),
    /// Anyone the cluster's RBAC lets `get` this non-resource path.
    MayGet(String),
}

/// The token check of one admin route.
pub struct TokenCheck {
    client: Client,
    audience: String,
    allowed: Allowed,
    /// What the route is, for the answers (e.g. "the stats stream").
    what: &'static str,
    /// Each token's last verdict (see [`TokenCheck::review`]) and when it was made.
    remembered: std::sync::Mutex<HashMap<String, (Instant, Option<bool>)>>,
    reviews: Arc<Semaphore>,
}

/// The token of an `Authorization: Bearer …` header.
pub fn bearer(h: &HeaderMap) -> Option<String> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty())
        .then(|| token.trim().to_string())
}

impl TokenCheck {
    pub fn new(client: Client, audience: &str, allowed: Allowed, what: &'static str) -> Self {
        info!(audience, ?allowed, "{what} needs a token");
        Self {
            client,
            audience: audience.to_string(),
            allowed,
            what,
            remembered: std::sync::Mutex::new(HashMap::new()),
            reviews: Arc::new(Semaphore::new(MAX_REVIEWS)),
        }
    }

    /// Ok when the request's token is allowed; otherwise the answer to send: 401 without
    /// a token or with one the API server does not accept for our audience, 403 for a
    /// user who is not allowed, 503 when the API server cannot tell now (not remembered).
    pub async fn check(&self, headers: &HeaderMap) -> Result<(), Response<Body>> {
        let Some(token) = bearer(headers) else {
            return Err(self.unauthenticated());
        };
        let known = {
            let m = self.remembered.lock().unwrap();
            m.get(&token)
                .and_then(|&(at, verdict)| fresh(at, verdict).then_some(verdict))
        };
        match known {
            Some(Some(true)) => return Ok(()),
            Some(Some(false)) => return Err(self.forbidden()),
            Some(None) => return Err(self.unauthenticated()),
            None => {}
        }
        let Ok(_permit) = self.reviews.clone().try_acquire_owned() else {
            return Err(unavailable("too many token reviews at once"));
        };
        let verdict = tokio::time::timeout(REVIEW_TIMEOUT, self.review(&token)).await;
        let ok = match verdict {
            Ok(Ok(ok)) => ok,
            Ok(Err(e)) => {
                warn!("{}: review failed: {e}", self.what);
                return Err(unavailable("cannot verify the token now"));
            }
            Err(_) => {
                warn!("{}: review timed out", self.what);
                return Err(unavailable("cannot verify the token now"));
            }
        };
        self.remember(token, ok);
        match ok {
            Some(true) => Ok(()),
            Some(false) => Err(self.forbidden()),
            None => Err(self.unauthenticated()),
        }
    }

    /// Some(allowed) for a token the API server accepts for our audience; None for one
    /// it does not.
    async fn review(&self, token: &str) -> Result<Option<bool>, kube::Error> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let status = api
            .create(&PostParams::default(), &review)
            .await?
            .status
            .unwrap_or_default();
        let for_us = status
            .audiences
            .as_ref()
            .is_some_and(|a| a.contains(&self.audience));
        let (true, true, Some(user)) = (status.authenticated == Some(true), for_us, status.user)
        else {
            warn!("{}: a token that is not ours was refused", self.what);
            return Ok(None);
        };
        let name = user.username.clone().unwrap_or_default();
        let ok = match &self.allowed {
            Allowed::User(u) => name == *u,
            Allowed::MayGet(path) => self.may_get(user, path).await?,
        };
        if !ok {
            warn!(user = name, "{}: refused", self.what);
        }
        Ok(Some(ok))
    }

    async fn may_get(&self, user: UserInfo, path: &str) -> Result<bool, kube::Error> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(path.to_string()),
                    verb: Some("get".into()),
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let status = api.create(&PostParams::default(), &review).await?.status;
        Ok(status.is_some_and(|s| s.allowed))
    }

    fn remember(&self, token: String, verdict: Option<bool>) {
        let mut m = self.remembered.lock().unwrap();
        m.retain(|_, &mut (at, verdict)| fresh(at, verdict));
        if m.len() >= MAX_REMEMBERED {
            // The allowed stay; the noise goes.
            m.retain(|_, &mut (_, verdict)| verdict == Some(true));
            if m.len() >= MAX_REMEMBERED {
                m.clear();
            }
        }
        m.insert(token, (Instant::now(), verdict));
    }

    fn unauthenticated(&self) -> Response<Body> {
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            format!(
                "snooze: {} needs a token made for the audience {:?} (Authorization: Bearer)\n",
                self.what, self.audience
            ),
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        r
    }

    fn forbidden(&self) -> Response<Body> {
        let who = match &self.allowed {
            Allowed::User(u) => format!("only {u} may read {}", self.what),
            Allowed::MayGet(p) => format!(
                "reading {} needs the right to get the non-resource URL {p} (RBAC nonResourceURLs)",
                self.what
            ),
        };
        text(StatusCode::FORBIDDEN, format!("snooze: {who}\n"))
    }
}

/// Whether a verdict made at `at` still holds.
fn fresh(at: Instant, verdict: Option<bool>) -> bool {
    at.elapsed()
        < if verdict == Some(true) {
            TRUST_FOR
        } else {
            REFUSE_FOR
        }
}

fn unavailable(why: &str) -> Response<Body> {
    let mut r = text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("snooze: {why}; retry\n"),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
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
