//! Command-line flags. Names, defaults and value formats follow the Go
//! endpoint picker of GIE so manifests and Helm values carry over: durations
//! are Go-style (`50ms`, `2s`, `1m30s`) and boolean flags take `--flag=false`.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::{ArgAction, Parser, ValueEnum};

use super::kv_events_flags::KvEventsFlags;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "epp",
    version,
    about = "Endpoint picker for the Gateway API Inference Extension",
    long_about = "Endpoint picker (EPP) for the Gateway API Inference Extension. \
        Envoy (or any gateway speaking envoy.service.ext_proc.v3) calls it for every \
        inference request; it reads the OpenAI body, scores the model-server endpoints \
        of the pool by prefix-cache affinity and load, and returns the destination."
)]
pub struct Flags {
    /// Port of the ext_proc gRPC server the gateway calls.
    #[arg(long, default_value_t = 9002, help_heading = "Serving")]
    pub grpc_port: u16,

    /// Port of the plaintext gRPC health server (kubelet probes, the gateway's health checks).
    #[arg(long, default_value_t = 9003, help_heading = "Serving")]
    pub grpc_health_port: u16,

    /// Port of the admin gRPC API (epp.admin.v1.Admin: ListEndpoints, Explain; with reflection
    /// and health), on --admin-address.
    #[arg(long, default_value_t = 9004, help_heading = "Serving")]
    pub admin_port: u16,

    /// Address the admin API listens on. Localhost by default: what it shows (pod addresses,
    /// per-pod scores, where a prompt would go) is for operators, who reach it with
    /// `kubectl port-forward`. Any other address opens it, unauthenticated, to whoever can connect.
    #[arg(long, default_value = "127.0.0.1", help_heading = "Serving")]
    pub admin_address: IpAddr,

    /// Port of the HTTP server exposing Prometheus /metrics.
    #[arg(long, default_value_t = 9090, help_heading = "Serving")]
    pub metrics_port: u16,

    /// Address the ext_proc, health and metrics servers listen on (the admin API: --admin-address).
    #[arg(long, default_value = "0.0.0.0", help_heading = "Serving")]
    pub listen_address: IpAddr,

    /// Serve ext_proc over TLS (ALPN h2). Use --secure-serving=false for plaintext h2c.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", help_heading = "Serving")]
    pub secure_serving: bool,

    /// Directory holding tls.crt and tls.key for ext_proc; a self-signed certificate is made in process when absent.
    #[arg(long, help_heading = "Serving")]
    pub cert_path: Option<PathBuf>,

    /// Reload tls.crt/tls.key from --cert-path when they change.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", help_heading = "Serving")]
    pub enable_cert_reload: bool,

    /// Also register gRPC health on the ext_proc port (it always is; accepted for compatibility,
    /// named in a startup warning when given).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", help_heading = "Serving")]
    pub health_checking: bool,

    /// How long in-flight streams may take to finish after SIGTERM.
    #[arg(long, default_value = "30s", value_parser = parse_duration, help_heading = "Serving")]
    pub shutdown_grace_period: Duration,

    /// Discover endpoints from a YAML or JSON file ({endpoints: [{name, address, port, labels}]}), re-read when it changes.
    #[arg(long, help_heading = "Discovery")]
    pub endpoints_file: Option<PathBuf>,

    /// How often the endpoints file is checked for changes.
    #[arg(long, default_value = "1s", value_parser = parse_duration, help_heading = "Discovery")]
    pub endpoints_file_poll_interval: Duration,

    /// Name of the InferencePool to watch (Kubernetes discovery).
    #[arg(long, help_heading = "Discovery")]
    pub pool_name: Option<String>,

    /// Namespace of the InferencePool; defaults to $NAMESPACE, then "default".
    #[arg(
        long,
        env = "NAMESPACE",
        default_value = "default",
        help_heading = "Discovery"
    )]
    pub pool_namespace: String,

    /// API group of the InferencePool.
    #[arg(
        long,
        default_value = "inference.networking.k8s.io",
        help_heading = "Discovery"
    )]
    pub pool_group: String,

    /// Standalone Kubernetes discovery without the InferencePool CRD: pod label selector k=v[,k2=v2].
    #[arg(long, help_heading = "Discovery")]
    pub endpoint_selector: Option<String>,

    /// Standalone Kubernetes discovery: target ports of the selected pods, comma-separated.
    #[arg(long, value_delimiter = ',', help_heading = "Discovery")]
    pub endpoint_target_ports: Vec<u16>,

    /// Ignore the gateway's subset hint (envoy.lb.subset_hint).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", help_heading = "Discovery")]
    pub disable_endpoint_subset_filter: bool,

    /// Run with leader election (coordination.k8s.io Lease); non-leaders report NOT_SERVING.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", help_heading = "Discovery")]
    pub ha_enable_leader_election: bool,

    /// Scheduler configuration (EndpointPickerConfig, YAML or JSON); the built-in default when absent.
    #[arg(long, conflicts_with = "config_text", help_heading = "Scheduling")]
    pub config_file: Option<PathBuf>,

    /// Scheduler configuration given inline.
    #[arg(long, help_heading = "Scheduling")]
    pub config_text: Option<String>,

    /// How many fallback endpoints follow the pick in x-gateway-destination-endpoint (0 for ORIGINAL_DST clusters).
    #[arg(long, default_value_t = 2, help_heading = "Scheduling")]
    pub fallback_endpoints: usize,

    /// Largest request body accepted; larger bodies get 413.
    #[arg(long, default_value = "16MiB", value_parser = parse_bytes, help_heading = "Scheduling")]
    pub max_request_body_bytes: u64,

    /// Echo the served endpoint into the response header x-conformance-test-served-endpoint
    /// (always on when the header-based-testing-filter is configured).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", help_heading = "Scheduling")]
    pub echo_served_endpoint: bool,

    /// Whether the picker asks for response bodies when the gateway does not send them
    /// (a per-request mode override; needs allow_mode_override in Envoy).
    #[arg(long, value_enum, default_value_t = ResponseProcessing::Full, help_heading = "Scheduling")]
    pub response_processing: ResponseProcessing,

    /// How often each endpoint's /metrics is scraped.
    #[arg(long, default_value = "50ms", value_parser = parse_duration, help_heading = "Metrics scraping")]
    pub refresh_metrics_interval: Duration,

    /// Scraped metrics older than this count as stale (saturated, excluded from pool averages).
    #[arg(long, default_value = "2s", value_parser = parse_duration, help_heading = "Metrics scraping")]
    pub metrics_staleness_threshold: Duration,

    /// Timeout of one scrape.
    #[arg(long, default_value = "1s", value_parser = parse_duration, help_heading = "Metrics scraping")]
    pub metrics_scrape_timeout: Duration,

    /// Ask model servers for only the metrics the picker reads (`/metrics?name[]=...`, honoured by
    /// Python's prometheus_client as vLLM and SGLang serve it); a server whose filtered page lacks
    /// metrics its full page has is scraped without the filter. `=false` sends the plain path.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", help_heading = "Metrics scraping")]
    pub metrics_name_filter: bool,

    /// Consecutive failed scrapes after which an endpoint is no longer picked.
    #[arg(long, default_value_t = 3, help_heading = "Metrics scraping")]
    pub max_scrape_failures: u32,

    /// Scheme of model-server metrics (also settable via the metrics-data-source plugin).
    #[arg(long, help_heading = "Metrics scraping")]
    pub model_server_metrics_scheme: Option<String>,

    /// Path of model-server metrics.
    #[arg(long, help_heading = "Metrics scraping")]
    pub model_server_metrics_path: Option<String>,

    /// Port of model-server metrics when it differs from the serving port.
    #[arg(long, help_heading = "Metrics scraping")]
    pub model_server_metrics_port: Option<u16>,

    /// Accepted for compatibility; metrics are scraped over plain HTTP (a startup warning says so when given).
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", help_heading = "Metrics scraping")]
    pub model_server_metrics_https_insecure_skip_verify: bool,

    /// How often pool-level gauges are recomputed (they are computed at scrape time; accepted for
    /// compatibility, a startup warning says so when given).
    #[arg(long, default_value = "5s", value_parser = parse_duration, help_heading = "Metrics scraping")]
    pub refresh_prometheus_metrics_interval: Duration,

    /// Require a bearer token on /metrics that the Kubernetes API accepts (TokenReview) and that may
    /// `get` the non-resource URL /metrics (SubjectAccessReview), as the Go picker does. Without
    /// Kubernetes (--endpoints-file) it needs --metrics-auth-token-file, else it is off (logged).
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", help_heading = "Telemetry")]
    pub metrics_endpoint_auth: bool,

    /// A file holding the bearer token /metrics requires (re-read when it changes). Replaces the
    /// Kubernetes check; the way to protect /metrics without Kubernetes.
    #[arg(long, help_heading = "Telemetry")]
    pub metrics_auth_token_file: Option<PathBuf>,

    /// Not supported: the picker serves no pprof endpoint. `--enable-pprof=false` is accepted
    /// (it asks for nothing); `true` is refused with what to use instead.
    #[arg(long, hide = true, default_value_t = false, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", value_parser = refuse_pprof, help_heading = "Telemetry")]
    pub enable_pprof: bool,

    /// Export OpenTelemetry traces over OTLP/gRPC, configured by the standard OTEL_* variables
    /// (OTEL_EXPORTER_OTLP_ENDPOINT or _TRACES_ENDPOINT, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER and
    /// _ARG, default parentbased_traceidratio 0.1 as the Go picker). Without an endpoint nothing
    /// is recorded or sent.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", help_heading = "Telemetry")]
    pub tracing: bool,

    /// Log verbosity as in the Go picker: 0-3 info, 4 debug (one line per request with scores), 5+ trace. RUST_LOG overrides.
    #[arg(short = 'v', long = "v", default_value_t = 0, num_args = 0..=1,
          default_missing_value = "4", help_heading = "Telemetry")]
    pub verbosity: u8,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, help_heading = "Telemetry")]
    pub log_format: LogFormat,

    /// Go picker's log encoder flag: json or console (overrides --log-format).
    #[arg(long, help_heading = "Telemetry")]
    pub zap_encoder: Option<String>,

    #[command(flatten)]
    pub kv_events: KvEventsFlags,
    #[command(flatten)]
    pub tokenizer: super::TokenizerFlags,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// When the picker wants response bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ResponseProcessing {
    /// Always: token usage metrics, model-name restore, first-token timing.
    /// A gateway configured not to send bodies is asked for them per request.
    Full,
    /// Only when a request needs it (its model name was rewritten); otherwise
    /// whatever the gateway is configured to send. With a gateway that sends
    /// no response bodies this saves a round trip per response chunk.
    Minimal,
}

/// Flags the Go picker has that change nothing here, and why: given on the
/// command line, each is named in a startup warning (see [`ignored_flags`]).
pub const IGNORED_FLAGS: &[(&str, &str)] = &[
    (
        "health_checking",
        "--health-checking has no effect: gRPC health is always served on the ext_proc port and on --grpc-health-port",
    ),
    (
        "model_server_metrics_https_insecure_skip_verify",
        "--model-server-metrics-https-insecure-skip-verify has no effect: model servers are scraped over plain HTTP (https is refused)",
    ),
    (
        "refresh_prometheus_metrics_interval",
        "--refresh-prometheus-metrics-interval has no effect: the pool gauges are computed when /metrics is read",
    ),
];

/// The warnings for [`IGNORED_FLAGS`] given explicitly in `matches`.
pub fn ignored_flags(matches: &clap::ArgMatches) -> Vec<&'static str> {
    IGNORED_FLAGS
        .iter()
        .filter(|(id, _)| {
            matches!(
                matches.value_source(id),
                Some(
                    clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable
                )
            )
        })
        .map(|(_, why)| *why)
        .collect()
}

impl Flags {
    pub fn effective_log_format(&self) -> LogFormat {
        match self.zap_encoder.as_deref() {
            Some("json") => LogFormat::Json,
            Some(_) => LogFormat::Text,
            None => self.log_format,
        }
    }
}

/// `--enable-pprof`: false is fine, true is refused with what to use instead.
fn refuse_pprof(text: &str) -> Result<bool, String> {
    let on: bool = text
        .parse()
        .map_err(|_| format!("invalid boolean {text:?}"))?;
    if on {
        return Err(
            "the picker has no pprof endpoint (the Go picker's Go profiler has no \
                    equivalent here); profile the process with Linux perf instead: \
                    `perf record -F 99 -g -p <pid>` (release builds keep line tables), see \
                    docs/observability.md. Drop the flag or pass --enable-pprof=false"
                .to_owned(),
        );
    }
    Ok(false)
}

/// Parses a Go-style duration: a sequence of number+unit (`ns`, `us`, `µs`,
/// `ms`, `s`, `m`, `h`), e.g. `50ms`, `1m30s`, `1.5s`. A bare `0` is zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    if t.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = 0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("missing unit in duration {text:?}"))?;
        if num_len == 0 {
            return Err(format!("invalid duration {text:?}"));
        }
        let value: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("invalid number in duration {text:?}"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => return Err(format!("unknown unit {other:?} in duration {text:?}")),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

/// Parses a byte size: a plain number, or with a suffix `k`/`KB`/`KiB`,
/// `M`/`MB`/`MiB`, `G`/`GB`/`GiB` (binary multiples, as Kubernetes `Mi`).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let value: u64 = t[..digits]
        .parse()
        .map_err(|_| format!("invalid size {text:?}"))?;
    let scale: u64 = match t[digits..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "ki" | "kib" => 1 << 10,
        "m" | "mb" | "mi" | "mib" => 1 << 20,
        "g" | "gb" | "gi" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    value
        .checked_mul(scale)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Flags {
        let mut all = vec!["epp"];
        all.extend_from_slice(args);
        Flags::try_parse_from(all).unwrap()
    }

    #[test]
    fn defaults_match_the_go_picker() {
        let f = parse(&[]);
        assert_eq!(
            (f.grpc_port, f.grpc_health_port, f.metrics_port),
            (9002, 9003, 9090)
        );
        assert!(f.secure_serving);
        assert_eq!(f.fallback_endpoints, 2);
        assert_eq!(f.refresh_metrics_interval, Duration::from_millis(50));
        assert_eq!(f.metrics_staleness_threshold, Duration::from_secs(2));
        assert_eq!(f.max_request_body_bytes, 16 << 20);
        assert_eq!(f.verbosity, 0);
    }

    #[test]
    fn go_style_booleans() {
        assert!(!parse(&["--secure-serving=false"]).secure_serving);
        assert!(parse(&["--secure-serving"]).secure_serving);
        assert!(parse(&["--ha-enable-leader-election"]).ha_enable_leader_election);
        assert!(!parse(&["--metrics-endpoint-auth=false"]).metrics_endpoint_auth);
        assert!(parse(&[]).metrics_endpoint_auth);
        assert!(parse(&[]).tracing);
        assert!(parse(&[]).metrics_name_filter);
        assert!(!parse(&["--metrics-name-filter=false"]).metrics_name_filter);
    }

    #[test]
    fn pprof_is_refused_with_what_to_use_instead() {
        assert!(!parse(&[]).enable_pprof);
        assert!(!parse(&["--enable-pprof=false"]).enable_pprof);
        for on in [&["--enable-pprof"][..], &["--enable-pprof=true"]] {
            let mut argv = vec!["epp"];
            argv.extend_from_slice(on);
            let e = Flags::try_parse_from(argv).unwrap_err().to_string();
            assert!(e.contains("perf record"), "{e}");
        }
        assert!(
            !Flags::command()
                .render_long_help()
                .to_string()
                .contains("enable-pprof"),
            "hidden from --help"
        );
    }

    #[test]
    fn flags_that_do_nothing_are_named_when_given() {
        let matches = |args: &[&str]| {
            let mut argv = vec!["epp"];
            argv.extend_from_slice(args);
            Flags::command().try_get_matches_from(argv).unwrap()
        };
        assert!(ignored_flags(&matches(&[])).is_empty());
        let given = ignored_flags(&matches(&[
            "--health-checking",
            "--refresh-prometheus-metrics-interval=1s",
        ]));
        assert_eq!(given.len(), 2);
        assert!(given[0].starts_with("--health-checking has no effect"));
        assert!(
            ignored_flags(&matches(&[
                "--model-server-metrics-https-insecure-skip-verify=false"
            ]))[0]
                .contains("plain HTTP")
        );
        for (id, _) in IGNORED_FLAGS {
            assert!(
                Flags::command().get_arguments().any(|a| a.get_id() == *id),
                "{id} is a flag"
            );
        }
    }

    #[test]
    fn admin_api_is_on_localhost_by_default() {
        let f = parse(&[]);
        assert_eq!(
            (f.admin_port, f.admin_address.to_string().as_str()),
            (9004, "127.0.0.1")
        );
    }

    #[test]
    fn verbosity_forms() {
        assert_eq!(parse(&["-v"]).verbosity, 4);
        assert_eq!(parse(&["-v", "2"]).verbosity, 2);
        assert_eq!(parse(&["--v=5"]).verbosity, 5);
    }

    #[test]
    fn config_file_and_text_conflict() {
        assert!(
            Flags::try_parse_from(["epp", "--config-file", "a", "--config-text", "b"]).is_err()
        );
    }

    #[test]
    fn pool_group_defaults_to_the_v1_api() {
        assert_eq!(parse(&[]).pool_group, crate::discovery::kube::POOL_GROUP_V1);
    }

    #[test]
    fn target_ports_are_comma_separated() {
        assert_eq!(
            parse(&["--endpoint-target-ports", "8000,8001"]).endpoint_target_ports,
            vec![8000, 8001]
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("16MiB"), Ok(16 << 20));
        assert_eq!(parse_bytes("2Gi"), Ok(2 << 30));
        assert_eq!(parse_bytes("4k"), Ok(4096));
        assert!(parse_bytes("x").is_err());
        assert!(parse_bytes("99999999999999G").is_err());
    }

    #[test]
    fn zap_encoder_selects_json() {
        assert_eq!(
            parse(&["--zap-encoder", "json"]).effective_log_format(),
            LogFormat::Json
        );
        assert_eq!(parse(&[]).effective_log_format(), LogFormat::Text);
    }
}
