//! Delegated authentication and authorisation of the secure port, as upstream's
//! `DelegatingAuthenticationOptions` / `DelegatingAuthorizationOptions` do it: a bearer token is
//! checked with a `TokenReview`, the request with a `SubjectAccessReview` for its non-resource
//! path and verb; members of `system:masters` and the always-allowed paths
//! (`/healthz`, `/readyz`, `/livez` by default) skip the review. Requests without a token are
//! `system:anonymous`. Answers are cached for [`CACHE_TTL`] so scrapes do not load the API server.
//!
//! The port is reachable by anyone who reaches the node, so reviews are bounded: at most
//! [`MAX_REVIEWS_IN_FLIGHT`] requests are being reviewed at once (beyond that the answer is 429
//! at once), and the reviews go through a client of their own whose rate limit is not the one
//! lease renewals use, so a flood of requests cannot cost the leader its lease.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use tracing::{debug, warn};

/// How long review answers are reused (upstream's webhook cache TTLs are 10 s).
pub const CACHE_TTL: Duration = Duration::from_secs(10);

/// Requests reviewed at once; more are answered 429 without a review.
pub const MAX_REVIEWS_IN_FLIGHT: usize = 8;

/// Cached review answers kept at most (per cache); beyond that the oldest are dropped first.
const MAX_CACHED_ANSWERS: usize = 1024;

/// The outcome of checking one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Serve it.
    Allow,
    /// The token was not accepted (HTTP 401).
    Unauthenticated,
    /// The user may not do this (HTTP 403); the text says who and what.
    Forbidden(String),
    /// A review could not be made (HTTP 500); never treated as allowed.
    Error(String),
    /// Too many requests are being reviewed (HTTP 429); try again later.
    Busy,
}

/// Checks secure-port requests against the API server.
pub struct Authorizer {
    client: kube::Client,
    always_allow: Vec<String>,
    hasher: RandomState,
    ttl: Duration,
    users: Mutex<HashMap<u64, (Option<UserInfo>, Instant)>>,
    decisions: Mutex<HashMap<u64, (bool, Instant)>>,
    in_flight: tokio::sync::Semaphore,
}

impl Authorizer {
    /// An authoriser reviewing through `client`; `always_allow` paths are served to anyone.
    pub fn new(client: kube::Client, always_allow: Vec<String>) -> Self {
        Self {
            client,
            always_allow,
            hasher: RandomState::new(),
            ttl: CACHE_TTL,
            users: Mutex::default(),
            decisions: Mutex::default(),
            in_flight: tokio::sync::Semaphore::new(MAX_REVIEWS_IN_FLIGHT),
        }
    }

    /// Overrides how long review answers are reused.
    pub fn with_cache_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Decides whether a `verb` request for `path` with this `Authorization` header is served.
    pub async fn check(&self, path: &str, verb: &str, authorization: Option<&str>) -> Decision {
        if self.always_allow.iter().any(|p| p == path) {
            return Decision::Allow;
        }
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return Decision::Busy;
        };
        let user = match authorization.and_then(|h| h.strip_prefix("Bearer ")) {
            Some(token) => match self.authenticate(token.trim()).await {
                Ok(Some(user)) => user,
                Ok(None) => return Decision::Unauthenticated,
                Err(err) => return Decision::Error(format!("token review failed: {err}")),
            },
            None => UserInfo {
                username: Some("system:anonymous".into()),
                groups: Some(vec!["system:unauthenticated".into()]),
                ..UserInfo::default()
            },
        };
        let groups = user.groups.clone().unwrap_or_default();
        if groups.iter().any(|g| g == "system:masters") {
            return Decision::Allow;
        }
        let name = user.username.clone().unwrap_or_default();
        match self.authorize(&user, path, verb).await {
            Ok(true) => Decision::Allow,
            Ok(false) => Decision::Forbidden(format!(
                "user {name:?} cannot {verb} path {path:?} (groups {groups:?})"
            )),
            Err(err) => Decision::Error(format!("subject access review failed: {err}")),
        }
    }

    async fn authenticate(&self, token: &str) -> Result<Option<UserInfo>, kube::Error> {
        let key = self.hasher.hash_one(token);
        if let Some((user, at)) = locked(&self.users).get(&key)
            && at.elapsed() < self.ttl
        {
            return Ok(user.clone());
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                ..TokenReviewSpec::default()
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let status = reviewed.status.unwrap_or_default();
        let user = status
            .authenticated
            .unwrap_or(false)
            .then(|| status.user.unwrap_or_default());
        if user.is_none() {
            debug!(error = ?status.error, "bearer token rejected by TokenReview");
        }
        remember(&self.users, key, user.clone(), self.ttl);
        Ok(user)
    }

    async fn authorize(
        &self,
        user: &UserInfo,
        path: &str,
        verb: &str,
    ) -> Result<bool, kube::Error> {
        // The whole identity is the key: two users of one name may differ in groups or extra.
        let key = self.hasher.hash_one((
            &user.username,
            &user.uid,
            &user.groups,
            user.extra.as_ref().map(|e| e.iter().collect::<Vec<_>>()),
            path,
            verb,
        ));
        if let Some((allowed, at)) = locked(&self.decisions).get(&key)
            && at.elapsed() < self.ttl
        {
            return Ok(*allowed);
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups.clone(),
                uid: user.uid.clone(),
                extra: user.extra.clone(),
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(path.to_string()),
                    verb: Some(verb.to_string()),
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let reviewed = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .inspect_err(|err| warn!(error = %err, "SubjectAccessReview failed"))?;
        let allowed = reviewed.status.is_some_and(|s| s.allowed);
        remember(&self.decisions, key, allowed, self.ttl);
        Ok(allowed)
    }
}

/// A review cache, whatever panicked while it was held: entries are inserted and dropped whole,
/// so a poisoned cache is still a valid one.
fn locked<T>(cache: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Caches `value` under `key`, dropping expired answers, and the oldest ones beyond
/// [`MAX_CACHED_ANSWERS`] (random tokens must not grow the cache without bound).
fn remember<V>(cache: &Mutex<HashMap<u64, (V, Instant)>>, key: u64, value: V, ttl: Duration) {
    let mut cache = locked(cache);
    cache.retain(|_, (_, at)| at.elapsed() < ttl);
    while cache.len() >= MAX_CACHED_ANSWERS {
        let Some(oldest) = cache.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| *k) else {
            break;
        };
        cache.remove(&oldest);
    }
    cache.insert(key, (value, Instant::now()));
}

/// The SubjectAccessReview verb of an HTTP method (upstream's request-info mapping for
/// non-resource requests: GET and HEAD are `get`).
pub fn verb_of(method: &http::Method) -> String {
    match *method {
        http::Method::GET | http::Method::HEAD => "get".into(),
        http::Method::POST => "create".into(),
        http::Method::PUT => "update".into(),
        http::Method::PATCH => "patch".into(),
        http::Method::DELETE => "delete".into(),
        ref other => other.as_str().to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_is_reviewed_as_get() {
        assert_eq!(verb_of(&http::Method::HEAD), "get");
        assert_eq!(verb_of(&http::Method::GET), "get");
        assert_eq!(verb_of(&http::Method::POST), "create");
    }

    #[test]
    fn the_answer_cache_is_bounded() {
        let cache = Mutex::new(HashMap::new());
        for key in 0..(MAX_CACHED_ANSWERS as u64 + 10) {
            remember(&cache, key, true, Duration::from_secs(60));
        }
        assert_eq!(locked(&cache).len(), MAX_CACHED_ANSWERS);
    }
}
