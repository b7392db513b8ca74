//! A fake Kubernetes API server behind `tower_test::mock`, the way kube-rs
//! and controller-rs test against a mocked service, but stateful: it keeps
//! objects per resource with resourceVersions, answers list, watch, get,
//! create and replace like the real one (including 409 on a stale
//! resourceVersion and 410 Gone for a compacted watch), and streams changes
//! to open watches. Tests change objects through it and inject failures
//! (error statuses, dropped watches, absent CRDs).

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    convert::Infallible,
    sync::Arc,
};

use bytes::Bytes;
use epp::discovery::kube::DiscoveryStats;
use futures_util::{StreamExt, stream::BoxStream};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tower::Layer;

pub type FakeBody = StreamBody<BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

pub const NS: &str = "ns";
pub const PODS: &str = "pods";
pub const POOLS: &str = "inferencepools";
pub const OBJECTIVES: &str = "inferenceobjectives";
pub const REWRITES: &str = "inferencemodelrewrites";
/// llm-d.ai's kinds share their plurals with GIE's, so the fake keeps them
/// apart by group and version (see [`route`]).
pub const LLMD_OBJECTIVES_V1: &str = "inferenceobjectives@llm-d.ai/v1";
pub const LLMD_OBJECTIVES_V1ALPHA2: &str = "inferenceobjectives@llm-d.ai/v1alpha2";
pub const LLMD_REWRITES_V1: &str = "inferencemodelrewrites@llm-d.ai/v1";
pub const LLMD_REWRITES_V1ALPHA2: &str = "inferencemodelrewrites@llm-d.ai/v1alpha2";
pub const LEASES: &str = "leases";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug)]
struct LogEntry {
    rv: u64,
    plural: String,
    change: Change,
    old: Option<Value>,
    new: Value,
}

#[derive(Debug)]
struct Watch {
    plural: String,
    selector: Selector,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Debug, Clone, Default)]
struct Selector {
    labels: Vec<(String, String)>,
    name: Option<String>,
}

impl Selector {
    fn matches(&self, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        if let Some(name) = &self.name
            && meta["name"].as_str() != Some(name)
        {
            return false;
        }
        self.labels
            .iter()
            .all(|(k, v)| meta["labels"][k].as_str() == Some(v))
    }
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    objects: HashMap<String, BTreeMap<String, Value>>,
    log: Vec<LogEntry>,
    /// Watches from an older resourceVersion get 410 Gone.
    compacted: u64,
    watches: Vec<Watch>,
    absent: HashSet<String>,
    failures: HashMap<String, VecDeque<u16>>,
    list_failures: HashMap<String, VecDeque<u16>>,
    requests: Vec<String>,
    /// Every request fails at the transport (connection refused), as when
    /// the API server is down or cut off by the network.
    unreachable: bool,
    refused: u64,
    /// Bearer tokens the TokenReview accepts, and whose they are.
    tokens: HashMap<String, String>,
    /// Users the SubjectAccessReview allows to `get` the non-resource URL
    /// /metrics.
    metrics_readers: HashSet<String>,
}

/// Handle on the fake server; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

/// A kube client talking to a new fake server, with the discovery stats
/// layer in its stack as in production.
pub fn start() -> (kube::Client, FakeApi, Arc<DiscoveryStats>) {
    let (service, mut handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<FakeBody>>();
    let stats = Arc::new(DiscoveryStats::default());
    let client = kube::Client::new(stats.layer().layer(service), NS);
    let fake = FakeApi::default();
    let server = fake.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            if server.refuse() {
                send.send_error(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "connection refused (fake API server unreachable)",
                ));
                continue;
            }
            let response = server.handle(request).await;
            send.send_response(response);
        }
    });
    (client, fake, stats)
}

fn full(status: StatusCode, body: Vec<u8>) -> Response<FakeBody> {
    let frames = futures_util::stream::iter([Ok(Frame::data(Bytes::from(body)))]).boxed();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(StreamBody::new(frames))
        .expect("valid response")
}

fn status(code: u16, reason: &str, message: &str) -> Response<FakeBody> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
    full(
        StatusCode::from_u16(code).expect("valid code"),
        body.to_string().into_bytes(),
    )
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(uri: &http::Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn selector(q: &HashMap<String, String>) -> Selector {
    let labels = q
        .get("labelSelector")
        .map(|s| {
            s.split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let name = q
        .get("fieldSelector")
        .and_then(|s| s.strip_prefix("metadata.name="))
        .map(str::to_owned);
    Selector { labels, name }
}

/// `(key, name)` of `/api/v1/namespaces/ns/pods[/name]` or
/// `/apis/g/v/namespaces/ns/plural[/name]`. The key is the plural, except
/// in the `llm-d.ai` group, where it is `plural@llm-d.ai/version`: that
/// group's kinds have the same plurals as GIE's, and tests serve one version
/// and not the other.
fn route(path: &str) -> Option<(String, Option<String>)> {
    let segments: Vec<&str> = path.split('/').collect();
    let at = segments.iter().position(|s| *s == "namespaces")?;
    let plural = (*segments.get(at + 2)?).to_owned();
    let name = segments.get(at + 3).map(|s| (*s).to_owned());
    let key = match segments.as_slice() {
        ["", "apis", "llm-d.ai", version, ..] => format!("{plural}@llm-d.ai/{version}"),
        _ => plural,
    };
    Some((key, name))
}

fn event_line(change: Change, obj: &Value) -> Bytes {
    let kind = match change {
        Change::Added => "ADDED",
        Change::Modified => "MODIFIED",
        Change::Deleted => "DELETED",
    };
    Bytes::from(format!("{}\n", json!({"type": kind, "object": obj})))
}

/// The event a watch with `selector` sees for a change, if any.
fn filtered(selector: &Selector, e: &LogEntry) -> Option<Bytes> {
    let was = e.old.as_ref().is_some_and(|o| selector.matches(o));
    let is = selector.matches(&e.new);
    let change = match (e.change, was, is) {
        (Change::Deleted, true, _) => Change::Deleted,
        (Change::Deleted, false, _) => return None,
        (_, false, true) => Change::Added,
        (_, true, true) => Change::Modified,
        (_, true, false) => Change::Deleted,
        (_, false, false) => return None,
    };
    Some(event_line(change, &e.new))
}

impl State {
    fn record(&mut self, plural: &str, change: Change, old: Option<Value>, new: Value) {
        let entry = LogEntry {
            rv: self.rv,
            plural: plural.to_owned(),
            change,
            old,
            new,
        };
        self.watches.retain(|w| {
            if w.plural != entry.plural {
                return true;
            }
            match filtered(&w.selector, &entry) {
                Some(line) => w.tx.send(line).is_ok(),
                None => !w.tx.is_closed(),
            }
        });
        self.log.push(entry);
    }

    fn store(&mut self, plural: &str, mut obj: Value) -> Value {
        self.rv += 1;
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("objects have names")
            .to_owned();
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        obj["metadata"]["namespace"] = json!(NS);
        let old = self
            .objects
            .entry(plural.to_owned())
            .or_default()
            .insert(name, obj.clone());
        let change = if old.is_some() {
            Change::Modified
        } else {
            Change::Added
        };
        self.record(plural, change, old, obj.clone());
        obj
    }

    fn remove(&mut self, plural: &str, name: &str) -> Option<Value> {
        let mut old = self.objects.get_mut(plural)?.remove(name)?;
        self.rv += 1;
        let before = old.clone();
        old["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(plural, Change::Deleted, Some(before), old.clone());
        Some(old)
    }

    /// TokenReview and SubjectAccessReview (cluster-scoped creates), as
    /// the API server answers them.
    fn review(&mut self, plural: &str, body: &[u8]) -> Response<FakeBody> {
        if let Some(code) = self.failures.get_mut(plural).and_then(VecDeque::pop_front) {
            return status(code, "InternalError", "injected failure");
        }
        let mut obj: Value = serde_json::from_slice(body).expect("JSON body");
        obj["status"] = if plural == "tokenreviews" {
            match obj["spec"]["token"]
                .as_str()
                .and_then(|t| self.tokens.get(t))
            {
                Some(user) => json!({"authenticated": true, "user": {
                    "username": user, "uid": format!("uid-{user}"),
                    "groups": ["system:serviceaccounts", "system:authenticated"]}}),
                None => json!({"authenticated": false, "error": "invalid bearer token"}),
            }
        } else {
            let spec = &obj["spec"];
            let allowed = spec["user"]
                .as_str()
                .is_some_and(|u| self.metrics_readers.contains(u))
                && spec["nonResourceAttributes"]["path"] == "/metrics"
                && spec["nonResourceAttributes"]["verb"] == "get";
            json!({"allowed": allowed})
        };
        full(StatusCode::CREATED, obj.to_string().into_bytes())
    }

    fn handle(&mut self, method: &Method, uri: &http::Uri, body: &[u8]) -> Response<FakeBody> {
        self.requests.push(format!("{method} {uri}"));
        match (method, uri.path()) {
            (&Method::POST, "/apis/authentication.k8s.io/v1/tokenreviews") => {
                return self.review("tokenreviews", body);
            }
            (&Method::POST, "/apis/authorization.k8s.io/v1/subjectaccessreviews") => {
                return self.review("subjectaccessreviews", body);
            }
            _ => {}
        }
        let Some((plural, name)) = route(uri.path()) else {
            return status(404, "NotFound", "unknown path");
        };
        if let Some(code) = self.failures.get_mut(&plural).and_then(VecDeque::pop_front) {
            return status(code, "InternalError", "injected failure");
        }
        if self.absent.contains(&plural) {
            return full(StatusCode::NOT_FOUND, b"404 page not found".to_vec());
        }
        let q = query(uri);
        let is_list = *method == Method::GET
            && name.is_none()
            && !q.get("watch").is_some_and(|w| w == "true" || w == "1");
        if is_list
            && let Some(code) = self
                .list_failures
                .get_mut(&plural)
                .and_then(VecDeque::pop_front)
        {
            return status(code, "InternalError", "injected list failure");
        }
        let objects = self.objects.entry(plural.clone()).or_default();
        match (method.clone(), name) {
            (Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                let from: u64 = q
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let selector = selector(&q);
                let (tx, rx) = mpsc::unbounded_channel();
                if from < self.compacted {
                    let gone = json!({"type": "ERROR", "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": "too old resource version", "reason": "Expired", "code": 410}});
                    let _ = tx.send(Bytes::from(format!("{gone}\n")));
                } else {
                    for e in self
                        .log
                        .iter()
                        .filter(|e| e.plural == plural && e.rv > from)
                    {
                        if let Some(line) = filtered(&selector, e) {
                            let _ = tx.send(line);
                        }
                    }
                    self.watches.push(Watch {
                        plural,
                        selector,
                        tx,
                    });
                }
                let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
                })
                .boxed();
                Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "application/json")
                    .body(StreamBody::new(frames))
                    .expect("valid response")
            }
            (Method::GET, None) => {
                let selector = selector(&q);
                let items: Vec<&Value> = objects.values().filter(|o| selector.matches(o)).collect();
                let list = json!({"apiVersion": "v1", "kind": "List",
                    "metadata": {"resourceVersion": self.rv.to_string()}, "items": items});
                full(StatusCode::OK, list.to_string().into_bytes())
            }
            (Method::GET, Some(name)) => match objects.get(&name) {
                Some(obj) => full(StatusCode::OK, obj.to_string().into_bytes()),
                None => status(404, "NotFound", &format!("{plural} {name:?} not found")),
            },
            (Method::POST, None) => {
                let obj: Value = serde_json::from_slice(body).expect("JSON body");
                let name = obj["metadata"]["name"].as_str().unwrap_or_default();
                if objects.contains_key(name) {
                    return status(
                        409,
                        "AlreadyExists",
                        &format!("{plural} {name:?} already exists"),
                    );
                }
                let stored = self.store(&plural, obj);
                full(StatusCode::CREATED, stored.to_string().into_bytes())
            }
            (Method::PUT, Some(name)) => {
                let obj: Value = serde_json::from_slice(body).expect("JSON body");
                let Some(current) = objects.get(&name) else {
                    return status(404, "NotFound", &format!("{plural} {name:?} not found"));
                };
                if obj["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                    return status(409, "Conflict", "the object has been modified");
                }
                let stored = self.store(&plural, obj);
                full(StatusCode::OK, stored.to_string().into_bytes())
            }
            _ => status(405, "MethodNotAllowed", "not supported by the fake"),
        }
    }
}

impl FakeApi {
    async fn handle(&self, request: Request<kube::client::Body>) -> Response<FakeBody> {
        let (parts, body) = request.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        self.state.lock().handle(&parts.method, &parts.uri, &body)
    }

    /// Creates or updates an object (its resourceVersion is assigned).
    pub fn apply(&self, plural: &str, obj: Value) -> Value {
        self.state.lock().store(plural, obj)
    }

    pub fn delete(&self, plural: &str, name: &str) {
        self.state.lock().remove(plural, name);
    }

    pub fn get(&self, plural: &str, name: &str) -> Option<Value> {
        self.state.lock().objects.get(plural)?.get(name).cloned()
    }

    /// The next `times` requests about `plural` fail with `code`.
    pub fn fail_next(&self, plural: &str, code: u16, times: usize) {
        self.state
            .lock()
            .failures
            .entry(plural.to_owned())
            .or_default()
            .extend(std::iter::repeat_n(code, times));
    }

    /// The next `times` lists (not watches) of `plural` fail with `code`.
    pub fn fail_next_lists(&self, plural: &str, code: u16, times: usize) {
        self.state
            .lock()
            .list_failures
            .entry(plural.to_owned())
            .or_default()
            .extend(std::iter::repeat_n(code, times));
    }

    /// Serve 404 (CRD not installed) for `plural`, or stop doing so.
    pub fn set_absent(&self, plural: &str, absent: bool) {
        let mut s = self.state.lock();
        if absent {
            s.absent.insert(plural.to_owned());
        } else {
            s.absent.remove(plural);
        }
    }

    /// Makes the server unreachable (every request fails to connect and
    /// every open watch ends) or reachable again.
    pub fn set_unreachable(&self, unreachable: bool) {
        let mut s = self.state.lock();
        s.unreachable = unreachable;
        if unreachable {
            s.watches.clear();
        }
    }

    /// A bearer token the TokenReview accepts as `user`'s.
    pub fn add_token(&self, token: &str, user: &str) {
        self.state
            .lock()
            .tokens
            .insert(token.to_owned(), user.to_owned());
    }

    /// Lets `user` get /metrics (a ClusterRole with `nonResourceURLs:
    /// ["/metrics"]`, `verbs: ["get"]`, bound to it).
    pub fn allow_metrics(&self, user: &str) {
        self.state.lock().metrics_readers.insert(user.to_owned());
    }

    /// Requests refused while unreachable.
    pub fn refused(&self) -> u64 {
        self.state.lock().refused
    }

    fn refuse(&self) -> bool {
        let mut s = self.state.lock();
        if s.unreachable {
            s.refused += 1;
        }
        s.unreachable
    }

    /// Ends every open watch of `plural`, as a dropped connection would.
    pub fn drop_watches(&self, plural: &str) {
        self.state.lock().watches.retain(|w| w.plural != plural);
    }

    /// Forgets history: watches resuming from an older resourceVersion get
    /// 410 Gone and must relist.
    pub fn compact(&self) {
        let mut s = self.state.lock();
        s.compacted = s.rv;
        s.log.clear();
    }

    /// Open watches of `plural`.
    pub fn watches(&self, plural: &str) -> usize {
        self.state
            .lock()
            .watches
            .iter()
            .filter(|w| w.plural == plural && !w.tx.is_closed())
            .count()
    }

    /// Request lines (`METHOD uri`) seen so far that mention `needle`.
    pub fn requests(&self, needle: &str) -> Vec<String> {
        self.state
            .lock()
            .requests
            .iter()
            .filter(|r| r.contains(needle))
            .cloned()
            .collect()
    }
}
