//! Who may read /metrics (`--metrics-endpoint-auth`, default on, as in the
//! Go picker).
//!
//! A scrape must carry `Authorization: Bearer <token>`. Two ways to check it:
//!
//! - **Kubernetes** (the picker runs with a Kubernetes client): the API
//!   server says whose token it is (TokenReview), then whether that user
//!   may `get` the non-resource URL `/metrics` (SubjectAccessReview), as
//!   controller-runtime's `WithAuthenticationAndAuthorization` does for the
//!   Go picker. The picker's ServiceAccount needs `create` on both review
//!   kinds; the scraper's needs `get` on `nonResourceURLs: ["/metrics"]`.
//! - **A token file** (`--metrics-auth-token-file`): the bearer token must
//!   equal the file's content (trimmed), re-read when it changes. The way
//!   to protect /metrics without Kubernetes (`--endpoints-file`).
//!
//! Answers: 401 without a token or with one the API server (or the file)
//! does not accept, 403 for a valid token without the permission, 503 when
//! the API server cannot be asked (fail closed; logged at most once per
//! [`ERROR_LOG_INTERVAL`]). Verdicts are cached per token ([`ALLOW_TTL`],
//! [`DENY_TTL`], at most [`CACHE_ENTRIES`] tokens), so Prometheus' scrapes
//! do not each cost two API calls; failures are not cached.

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::api::{Api, PostParams};
use parking_lot::Mutex;

use super::log_limit::LogLimiter;

/// How long an accepted token stays accepted without asking again
/// (controller-runtime caches authentication for a minute).
pub const ALLOW_TTL: Duration = Duration::from_secs(60);
/// How long a refused token stays refused: short, so a permission granted
/// after a failed scrape takes effect soon.
pub const DENY_TTL: Duration = Duration::from_secs(10);
/// Tokens remembered at most (one per scraper, normally a handful).
pub const CACHE_ENTRIES: usize = 256;
/// Longest wait for one review from the API server (controller-runtime:
/// 10 s).
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one warning per interval about an API server that cannot be asked.
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// The path scrapers are authorised for.
const METRICS_PATH: &str = "/metrics";

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A valid token allowed to read /metrics: 200.
    Allowed,
    /// No token, or one that is not valid: 401.
    Unauthenticated,
    /// A valid token without the permission: 403.
    Forbidden,
    /// The token could not be checked (API server unreachable, timed out,
    /// refused the review): 503, nothing served.
    Unavailable,
}

impl Verdict {
    pub fn http_status(self) -> http::StatusCode {
        match self {
            Self::Allowed => http::StatusCode::OK,
            Self::Unauthenticated => http::StatusCode::UNAUTHORIZED,
            Self::Forbidden => http::StatusCode::FORBIDDEN,
            Self::Unavailable => http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Why the token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read --metrics-auth-token-file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--metrics-auth-token-file {0} is empty")]
    Empty(PathBuf),
}

/// One way of checking a token.
enum Checker {
    Kube(kube::Client),
    File(PathBuf),
}

/// The /metrics gate.
pub struct MetricsAuth {
    checker: Checker,
    cache: Mutex<HashMap<String, (Verdict, Instant)>>,
    errors: LogLimiter,
    review_timeout: Duration,
}

impl std::fmt::Debug for MetricsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match &self.checker {
            Checker::Kube(_) => "kubernetes".to_owned(),
            Checker::File(p) => format!("token file {}", p.display()),
        };
        f.debug_struct("MetricsAuth")
            .field("checker", &how)
            .finish()
    }
}

impl MetricsAuth {
    /// Checks tokens with the Kubernetes API (TokenReview, then
    /// SubjectAccessReview for `get /metrics`).
    pub fn kubernetes(client: kube::Client) -> Self {
        Self::new(Checker::Kube(client))
    }

    /// Checks tokens against the content of `path`, which must be readable
    /// and not empty now (a later unreadable file refuses every scrape).
    pub fn token_file(path: PathBuf) -> Result<Self, TokenFileError> {
        match std::fs::read_to_string(&path) {
            Ok(t) if t.trim().is_empty() => Err(TokenFileError::Empty(path)),
            Ok(_) => Ok(Self::new(Checker::File(path))),
            Err(source) => Err(TokenFileError::Read { path, source }),
        }
    }

    fn new(checker: Checker) -> Self {
        Self {
            checker,
            cache: Mutex::new(HashMap::new()),
            errors: LogLimiter::new(ERROR_LOG_INTERVAL),
            review_timeout: REVIEW_TIMEOUT,
        }
    }

    /// A shorter review timeout (tests).
    pub fn with_review_timeout(mut self, timeout: Duration) -> Self {
        self.review_timeout = timeout;
        self
    }

    /// The verdict for a request's `Authorization` header.
    pub async fn check(&self, authorization: Option<&[u8]>) -> Verdict {
        let Some(token) = authorization.and_then(bearer) else {
            return Verdict::Unauthenticated;
        };
        match &self.checker {
            Checker::File(path) => self.check_file(path, token).await,
            Checker::Kube(client) => {
                if let Some(v) = self.cached(token) {
                    return v;
                }
                let verdict = self.review(client, token).await;
                if verdict != Verdict::Unavailable {
                    self.remember(token, verdict);
                }
                verdict
            }
        }
    }

    async fn check_file(&self, path: &PathBuf, token: &str) -> Verdict {
        match tokio::fs::read_to_string(path).await {
            Ok(want) if !want.trim().is_empty() => {
                if constant_time_eq(want.trim().as_bytes(), token.as_bytes()) {
                    Verdict::Allowed
                } else {
                    Verdict::Unauthenticated
                }
            }
            Ok(_) => {
                self.warn(&format!("{} is empty", path.display()));
                Verdict::Unavailable
            }
            Err(e) => {
                self.warn(&format!("cannot read {}: {e}", path.display()));
                Verdict::Unavailable
            }
        }
    }

    fn cached(&self, token: &str) -> Option<Verdict> {
        let cache = self.cache.lock();
        let (verdict, at) = cache.get(token)?;
        let ttl = if *verdict == Verdict::Allowed {
            ALLOW_TTL
        } else {
            DENY_TTL
        };
        (at.elapsed() < ttl).then_some(*verdict)
    }

    fn remember(&self, token: &str, verdict: Verdict) {
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, (v, at)| {
                at.elapsed()
                    < if *v == Verdict::Allowed {
                        ALLOW_TTL
                    } else {
                        DENY_TTL
                    }
            });
            if cache.len() >= CACHE_ENTRIES {
                // Every entry is live: someone is trying many tokens. Forget
                // them all rather than grow.
                cache.clear();
            }
        }
        cache.insert(token.to_owned(), (verdict, Instant::now()));
    }

    /// TokenReview, then SubjectAccessReview.
    async fn review(&self, client: &kube::Client, token: &str) -> Verdict {
        let tokens: Api<TokenReview> = Api::all(client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                ..TokenReviewSpec::default()
            },
            ..TokenReview::default()
        };
        let reviewed = match self
            .ask(
                "TokenReview",
                tokens.create(&PostParams::default(), &review),
            )
            .await
        {
            Some(r) => r,
            None => return Verdict::Unavailable,
        };
        let status = reviewed.status.unwrap_or_default();
        let Some(user) = status.user.filter(|_| status.authenticated == Some(true)) else {
            tracing::debug!(error = ?status.error, "/metrics token not authenticated");
            return Verdict::Unauthenticated;
        };
        let access: Api<SubjectAccessReview> = Api::all(client.clone());
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(METRICS_PATH.to_owned()),
                    verb: Some("get".to_owned()),
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let Some(decided) = self
            .ask(
                "SubjectAccessReview",
                access.create(&PostParams::default(), &sar),
            )
            .await
        else {
            return Verdict::Unavailable;
        };
        if decided.status.is_some_and(|s| s.allowed) {
            Verdict::Allowed
        } else {
            tracing::debug!(user = ?user.username, "/metrics: not allowed to get /metrics");
            Verdict::Forbidden
        }
    }

    /// One review call, bounded by the review timeout; `None` (logged,
    /// rate-limited) when it could not be made.
    async fn ask<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Option<T> {
        match tokio::time::timeout(self.review_timeout, call).await {
            Ok(Ok(r)) => Some(r),
            Ok(Err(e)) => {
                self.warn(&format!("{what} failed: {}", super::logging::chain(&e)));
                None
            }
            Err(_) => {
                self.warn(&format!("{what} timed out after {:?}", self.review_timeout));
                None
            }
        }
    }

    fn warn(&self, why: &str) {
        if let Some(suppressed) = self.errors.allow(Instant::now()) {
            tracing::warn!(
                error = why,
                suppressed,
                "cannot check a /metrics token; refusing the scrape (503)"
            );
        }
    }
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive).
fn bearer(header: &[u8]) -> Option<&str> {
    let header = std::str::from_utf8(header).ok()?.trim();
    let (scheme, token) = header.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_from_the_header() {
        assert_eq!(bearer(b"Bearer abc"), Some("abc"));
        assert_eq!(bearer(b"bearer  abc "), Some("abc"));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(bearer(b"\xff"), None);
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[tokio::test]
    async fn a_token_file_gates_the_scrape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        assert!(matches!(
            MetricsAuth::token_file(path.clone()),
            Err(TokenFileError::Read { .. })
        ));
        std::fs::write(&path, "  \n").unwrap();
        assert!(matches!(
            MetricsAuth::token_file(path.clone()),
            Err(TokenFileError::Empty(_))
        ));
        std::fs::write(&path, "s3cret\n").unwrap();
        let auth = MetricsAuth::token_file(path.clone()).unwrap();
        assert_eq!(auth.check(None).await, Verdict::Unauthenticated);
        assert_eq!(
            auth.check(Some(b"Bearer wrong")).await,
            Verdict::Unauthenticated
        );
        assert_eq!(auth.check(Some(b"Bearer s3cret")).await, Verdict::Allowed);
        std::fs::write(&path, "rotated").unwrap();
        assert_eq!(
            auth.check(Some(b"Bearer s3cret")).await,
            Verdict::Unauthenticated,
            "the file is re-read"
        );
        assert_eq!(auth.check(Some(b"Bearer rotated")).await, Verdict::Allowed);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            auth.check(Some(b"Bearer rotated")).await,
            Verdict::Unavailable,
            "fails closed"
        );
    }
}
