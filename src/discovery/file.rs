//! Discovery from a file, for running without Kubernetes.
//!
//! The file is YAML or JSON:
//!
//! ```yaml
//! endpoints:
//! - name: vllm-0
//!   address: 10.0.0.5        # an IP address (IPv4 or IPv6)
//!   port: 8000               # number or string
//!   labels: {inference.networking.k8s.io/engine-type: vllm}
//!   metricsPort: 8000        # optional
//!   kvEvents: {port: 5557, replayPort: 5558, topic: "", ranks: 1}  # optional
//! ```
//!
//! `kvEvents` overrides the `--kv-events-*` flags for one endpoint, each
//! field optional (two servers on one host need different ports: this is
//! how); `kvEvents: false` or `{enabled: false}` turns events off for it.
//! Without `--kv-events` the field is checked but no subscription starts.
//!
//! It is polled (cheap: one read per interval) rather than watched, which
//! also works for Kubernetes ConfigMap mounts, where the file is replaced
//! through a symlink swap that inotify-based watchers often miss. A file that
//! fails to read or validate, or is empty, keeps the last good endpoint set
//! and logs why, once per distinct content.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;
use tokio::sync::watch;

use super::kv_events::{KvEventsOverride, KvEventsSettings};
use crate::{
    endpoints::{EndpointSpec, EndpointStore},
    telemetry::logging::chain,
};

/// Largest endpoints file accepted.
const MAX_FILE_BYTES: u64 = 4 << 20;

/// Why an endpoints file was not applied. As for every error here, a
/// variant either shows its cause in its message or exposes it as
/// `source()`, never both, so a printed chain names each cause once; the
/// `message` strings are our own, not flattened errors.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_FILE_BYTES} bytes")]
    TooLarge { path: String },
    #[error("invalid endpoints file")]
    Syntax(#[source] yaml_serde::Error),
    #[error("endpoint {index}: {message}")]
    Invalid { index: usize, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointsFile {
    #[serde(default)]
    endpoints: Vec<FileEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileEndpoint {
    #[serde(default)]
    name: Option<String>,
    /// Accepted for compatibility with llm-d's file discovery; unused.
    #[serde(default, rename = "namespace")]
    _namespace: Option<serde::de::IgnoredAny>,
    address: String,
    port: Port,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    metrics_port: Option<Port>,
    #[serde(default)]
    kv_events: Option<FileKvEvents>,
}

/// `kvEvents:` of one endpoint: a switch, or the fields to override.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FileKvEvents {
    Switch(bool),
    Fields(FileKvEventsFields),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileKvEventsFields {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    port: Option<Port>,
    /// 0 turns replay off for this endpoint.
    #[serde(default)]
    replay_port: Option<u64>,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    ranks: Option<u64>,
}

impl FileKvEvents {
    fn to_override(&self) -> Result<KvEventsOverride, String> {
        let f = match self {
            Self::Switch(on) => {
                return Ok(KvEventsOverride {
                    enabled: Some(*on),
                    ..KvEventsOverride::default()
                });
            }
            Self::Fields(f) => f,
        };
        let replay_port = f
            .replay_port
            .map(|p| {
                u16::try_from(p)
                    .map_err(|_| format!("kvEvents replayPort {p} is out of range 0-65535"))
            })
            .transpose()?;
        let ranks = f
            .ranks
            .map(|r| u16::try_from(r).map_err(|_| format!("kvEvents ranks {r} is out of range")))
            .transpose()?;
        Ok(KvEventsOverride {
            enabled: f.enabled,
            port: f.port.as_ref().map(Port::value).transpose()?,
            replay_port,
            topic: f.topic.clone(),
            ranks,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Port {
    Number(u64),
    Text(String),
}

impl Port {
    fn value(&self) -> Result<u16, String> {
        let n = match self {
            Self::Number(n) => *n,
            Self::Text(s) => s
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("port {s:?} is not a number"))?,
        };
        match u16::try_from(n) {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(format!("port {n} is out of range 1-65535")),
        }
    }
}

/// Parses and validates an endpoints file, with events off (the `kvEvents`
/// fields are still checked).
pub fn parse_endpoints(text: &str) -> Result<Vec<EndpointSpec>, FileError> {
    parse_endpoints_with(text, &KvEventsSettings::default())
}

/// Parses and validates an endpoints file, resolving each endpoint's event
/// settings over `kv_events` (the flags').
pub fn parse_endpoints_with(
    text: &str,
    kv_events: &KvEventsSettings,
) -> Result<Vec<EndpointSpec>, FileError> {
    let file: EndpointsFile = if text.trim().is_empty() {
        EndpointsFile {
            endpoints: Vec::new(),
        }
    } else {
        yaml_serde::from_str(text).map_err(FileError::Syntax)?
    };
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(file.endpoints.len());
    for (index, e) in file.endpoints.into_iter().enumerate() {
        let invalid = |message: String| FileError::Invalid { index, message };
        let address: IpAddr = e
            .address
            .trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| invalid(format!("address {:?} is not an IP address", e.address)))?;
        let port = e.port.value().map_err(invalid)?;
        let metrics_port = e
            .metrics_port
            .map(|p| p.value())
            .transpose()
            .map_err(invalid)?;
        let kv = e
            .kv_events
            .as_ref()
            .map(FileKvEvents::to_override)
            .transpose()
            .map_err(invalid)?
            .unwrap_or_default();
        // Checked with events on, so a file that works only without them
        // fails now rather than when they are turned on.
        let check = KvEventsSettings {
            enabled: true,
            ..kv_events.clone()
        };
        check.resolve(&kv, 0).map_err(invalid)?;
        let kv_events = kv_events.resolve(&kv, 0).map_err(invalid)?;
        let name = e.name.unwrap_or_else(|| format!("{address}:{port}"));
        if !names.insert(name.clone()) {
            return Err(invalid(format!("name {name:?} is used twice")));
        }
        out.push(EndpointSpec {
            name,
            address,
            port,
            labels: e.labels,
            metrics_port,
            kv_events,
        });
    }
    Ok(out)
}

/// Polls the endpoints file and publishes its content into the store.
#[derive(Debug)]
pub struct FileDiscovery {
    path: PathBuf,
    interval: Duration,
    store: Arc<EndpointStore>,
    kv_events: KvEventsSettings,
}

impl FileDiscovery {
    pub fn new(path: PathBuf, interval: Duration, store: Arc<EndpointStore>) -> Self {
        Self {
            path,
            interval: interval.max(Duration::from_millis(10)),
            store,
            kv_events: KvEventsSettings::default(),
        }
    }

    /// Resolves each endpoint's event settings over `settings` (the flags').
    pub fn with_kv_events(mut self, settings: KvEventsSettings) -> Self {
        self.kv_events = settings;
        self
    }

    /// Reads the file once; `last` is the content last applied (or rejected).
    async fn poll(&self, last: &mut Option<Vec<u8>>) {
        let content = match self.read().await {
            Ok(c) => c,
            Err(e) => {
                if last.as_deref() != Some(b"\0unreadable") {
                    tracing::error!(error = %chain(&e), "endpoints file unreadable; keeping the last good endpoints");
                    *last = Some(b"\0unreadable".to_vec());
                }
                return;
            }
        };
        if last.as_deref() == Some(content.as_slice()) {
            return;
        }
        // An empty file is what a writer that truncates before writing
        // leaves for a moment (`>` in a shell, most editors): taking it as
        // "no endpoints" would empty the pool and fail every request until
        // the write lands. Removing every endpoint takes `endpoints: []`.
        if content.iter().all(u8::is_ascii_whitespace) {
            tracing::warn!(path = %self.path.display(),
                "endpoints file is empty; keeping the last good endpoints (write `endpoints: []` to remove them all)");
            *last = Some(content);
            return;
        }
        let text = String::from_utf8_lossy(&content);
        match parse_endpoints_with(&text, &self.kv_events) {
            Ok(specs) => {
                let n = specs.len();
                match self.store.replace(specs) {
                    Ok(()) => {
                        tracing::info!(path = %self.path.display(), endpoints = n, "endpoints file loaded")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "endpoints file rejected; keeping the last good endpoints")
                    }
                }
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %chain(&e), "endpoints file invalid; keeping the last good endpoints");
            }
        }
        *last = Some(content);
    }

    async fn read(&self) -> Result<Vec<u8>, FileError> {
        let path = self.path.display().to_string();
        let meta = tokio::fs::metadata(&self.path)
            .await
            .map_err(|source| FileError::Read {
                path: path.clone(),
                source,
            })?;
        if meta.len() > MAX_FILE_BYTES {
            return Err(FileError::TooLarge { path });
        }
        tokio::fs::read(&self.path)
            .await
            .map_err(|source| FileError::Read { path, source })
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut last = None;
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.poll(&mut last).await,
                _ = crate::shutdown::requested(&mut shutdown) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_and_json_with_numeric_or_string_ports() {
        let yaml = "endpoints:\n- name: a\n  address: 10.0.0.1\n  port: 8000\n  labels: {x: y}\n- address: '::1'\n  port: \"8001\"\n  metricsPort: 9000\n";
        let e = parse_endpoints(yaml).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].host_port(), "10.0.0.1:8000");
        assert_eq!(e[0].labels["x"], "y");
        assert_eq!(e[1].host_port(), "[::1]:8001");
        assert_eq!(e[1].name, "::1:8001");
        assert_eq!(e[1].metrics_port, Some(9000));
        let json = r#"{"endpoints":[{"name":"a","address":"127.0.0.1","port":"80"}]}"#;
        assert_eq!(parse_endpoints(json).unwrap()[0].port, 80);
        assert!(parse_endpoints("").unwrap().is_empty());
        assert!(parse_endpoints("endpoints: []").unwrap().is_empty());
    }

    #[test]
    fn invalid_files_say_why() {
        for (text, needle) in [
            (
                "endpoints:\n- address: host.example\n  port: 1\n",
                "not an IP",
            ),
            (
                "endpoints:\n- address: 1.2.3.4\n  port: 70000\n",
                "out of range",
            ),
            (
                "endpoints:\n- address: 1.2.3.4\n  port: 0\n",
                "out of range",
            ),
            (
                "endpoints:\n- address: 1.2.3.4\n  port: abc\n",
                "not a number",
            ),
            ("endpoints:\n- address: 1.2.3.4\n", "port"),
            (
                "endpoints:\n- {name: a, address: 1.2.3.4, port: 1}\n- {name: a, address: 1.2.3.5, port: 1}\n",
                "twice",
            ),
            (
                "endpoints:\n- {address: 1.2.3.4, port: 1, colour: red}\n",
                "unknown field",
            ),
            ("endpoints: [", "invalid"),
        ] {
            let err = chain(&parse_endpoints(text).unwrap_err()).to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn kv_events_field_overrides_the_flags_per_endpoint() {
        use crate::endpoints::KvEventsSpec;
        let on = KvEventsSettings {
            enabled: true,
            ..KvEventsSettings::default()
        };
        let yaml = "endpoints:
- {name: a, address: 127.0.0.1, port: 8000, kvEvents: {port: 6000, replayPort: 0, topic: 'kv@', ranks: 2}}
- {name: b, address: 127.0.0.1, port: 8001}
- {name: c, address: 127.0.0.1, port: 8002, kvEvents: false}
- {name: d, address: 127.0.0.1, port: 8003, kvEvents: {enabled: false, port: 7000}}
- {name: e, address: 127.0.0.1, port: 8004, kvEvents: {replayPort: 6001}}
";
        let e = parse_endpoints_with(yaml, &on).unwrap();
        let spec = |port, replay_port, topic: &str, ranks| {
            Some(KvEventsSpec {
                port,
                replay_port,
                topic: topic.into(),
                ranks,
            })
        };
        assert_eq!(e[0].kv_events, spec(6000, None, "kv@", 2));
        assert_eq!(e[1].kv_events, spec(5557, Some(5558), "", 1));
        assert_eq!(e[2].kv_events, None);
        assert_eq!(e[3].kv_events, None);
        assert_eq!(e[4].kv_events, spec(5557, Some(6001), "", 1));
        assert!(
            parse_endpoints(yaml)
                .unwrap()
                .iter()
                .all(|e| e.kv_events.is_none()),
            "no subscription without --kv-events"
        );
        for (field, needle) in [
            ("{port: 0}", "out of range"),
            ("{ranks: 0}", "out of range"),
            ("{port: 65535, ranks: 2}", "passes 65535"),
            ("{replayPort: 70000}", "out of range"),
            ("{colour: red}", "did not match"),
        ] {
            let text = format!("endpoints:\n- {{address: 1.2.3.4, port: 1, kvEvents: {field}}}\n");
            // Checked even with events off.
            let err = chain(&parse_endpoints(&text).unwrap_err()).to_string();
            assert!(err.contains(needle), "{field}: {err}");
        }
    }

    #[tokio::test]
    async fn bad_content_keeps_the_last_good_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("endpoints.yaml");
        std::fs::write(&path, "endpoints:\n- {address: 127.0.0.1, port: 1}\n").unwrap();
        let store = Arc::new(EndpointStore::new(Duration::from_secs(1)));
        let d = FileDiscovery::new(path.clone(), Duration::from_millis(10), Arc::clone(&store));
        let mut last = None;
        d.poll(&mut last).await;
        assert!(store.is_synced());
        assert_eq!(store.snapshot().len(), 1);

        std::fs::write(&path, "endpoints: [garbage").unwrap();
        d.poll(&mut last).await;
        assert_eq!(
            store.snapshot().len(),
            1,
            "invalid file keeps the last good set"
        );

        std::fs::write(&path, "").unwrap();
        d.poll(&mut last).await;
        assert_eq!(
            store.snapshot().len(),
            1,
            "an emptied (truncated) file keeps the last good set"
        );

        std::fs::remove_file(&path).unwrap();
        d.poll(&mut last).await;
        assert_eq!(
            store.snapshot().len(),
            1,
            "missing file keeps the last good set"
        );

        std::fs::write(&path, "endpoints: []\n").unwrap();
        d.poll(&mut last).await;
        assert_eq!(store.snapshot().len(), 0, "an explicit empty list applies");

        std::fs::write(
            &path,
            "endpoints:\n- {address: 127.0.0.1, port: 1}\n- {address: 127.0.0.1, port: 2}\n",
        )
        .unwrap();
        d.poll(&mut last).await;
        assert_eq!(store.snapshot().len(), 2);
        let generation = store.snapshot().generation();
        d.poll(&mut last).await;
        assert_eq!(
            store.snapshot().generation(),
            generation,
            "unchanged content publishes nothing"
        );
    }

    #[tokio::test]
    async fn missing_file_at_start_is_not_synced() {
        let store = Arc::new(EndpointStore::new(Duration::from_secs(1)));
        let d = FileDiscovery::new(
            "/nonexistent/epp.yaml".into(),
            Duration::from_millis(10),
            Arc::clone(&store),
        );
        d.poll(&mut None).await;
        assert!(!store.is_synced());
    }
}
