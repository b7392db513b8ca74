//! Wiring: builds every component from the flags and runs the four servers
//! (ext_proc, health, admin, metrics) and the background tasks (discovery,
//! leader election, scraping, prefix-index upkeep, readiness) until shutdown.
//!
//! [`run`] reads as the steps it takes: build the core (store, index,
//! scheduler, director, metrics registry), bind the listeners, start
//! discovery and leader election, start the background tasks, start the
//! servers, wait for shutdown, drain.
//!
//! KV-cache events (`--kv-events`): a supervisor on its own thread follows
//! the endpoint set and runs one subscription per endpoint and rank, so event
//! ingest, however malformed or heavy, never runs on the request path's
//! runtime.
//!
//! Discovery: `--endpoints-file` if given, else Kubernetes (`--pool-name`
//! or `--endpoint-selector`, exactly one). With
//! `--ha-enable-leader-election` a Lease elector drives readiness' leader
//! input (it starts false, so a replica serves only once it leads).
//!
//! Shutdown (SIGTERM): readiness turns NOT_SERVING at once so the gateway
//! stops sending new streams, a leader releases its lease so a standby takes
//! over at once, the listeners stop accepting, in-flight
//! ext_proc streams may finish within `--shutdown-grace-period`, then the
//! process exits 0.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use prometheus::Registry;
use tokio::{sync::watch, task::JoinHandle};
use tonic::transport::Server;

use crate::{
    admin::{
        AdminService,
        health::{ReadinessInputs, readiness_loop},
        pb::admin_server::AdminServer,
    },
    config::{
        ConfigError, EndpointPickerConfig, Flags, ModelRewriteSpec, ResponseProcessing,
        RewriteTarget,
    },
    director::{Director, SLO_TTFT_HEADER, SloAdmission},
    discovery::{
        DiscoveryMetrics, DiscoverySource, FileDiscovery, KvEventsSettings,
        kube::{
            self as kube_discovery, DiscoveryStats, KubeDiscovery, KubeDiscoveryError,
            KubeDiscoveryOptions, LeaderElectionConfig, LeaderElector, RewriteRule, Target,
            TargetSettings,
        },
    },
    endpoints::{EndpointStore, PoolMetrics},
    extproc::{ExtProcService, StreamSettings},
    flow_control::{FlowControlConfigError, FlowControlSettings, FlowController},
    kv_events::{KvEventsMetrics, Supervisor, SupervisorSettings},
    listener::{
        BindError, Listener,
        tls::{self, TlsError, TlsSetup},
    },
    prefix::{IndexMetrics, PrefixIndex},
    scheduling::{BuildError, SchedulerOptions, build_scheduler},
    scrape::{ScrapeMetrics, ScrapeSettings, Scraper, ScraperOptions, SettingsError},
    telemetry::{
        RequestMetrics, TelemetryError,
        logging::chain,
        metrics_auth::{MetricsAuth, TokenFileError},
        register_build_info, serve_metrics,
        traces::RequestTracer,
    },
    tokenize::{TokenizeError, Tokenizers},
};

/// Flow-control window, per stream and per connection, on the ext_proc
/// listener. hyper's default, set here so the choice is visible: larger
/// windows let Envoy push every in-flight request body at once, which
/// costs memory and throughput with large bodies (bench/results/perf.md).
const H2_WINDOW: u32 = 1 << 20;

/// Why the picker could not start or keep serving. Each variant names the
/// step; its cause is the source, so every cause is printed once.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("scheduler config")]
    Scheduler(#[from] BuildError),
    #[error("metrics scraping config")]
    Scrape(#[from] SettingsError),
    #[error("TLS")]
    Tls(#[from] TlsError),
    #[error("loading tokenizers")]
    Tokenizers(#[from] TokenizeError),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error(transparent)]
    FlowControl(#[from] FlowControlConfigError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    MetricsAuth(#[from] TokenFileError),
    #[error(
        "no discovery configured: give --endpoints-file, --pool-name, or --endpoint-selector with --endpoint-target-ports"
    )]
    NoDiscovery,
    #[error("Kubernetes discovery")]
    Discovery(#[from] KubeDiscoveryError),
    #[error("gRPC reflection")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("starting the {what}")]
    Start {
        what: &'static str,
        source: std::io::Error,
    },
}

/// Addresses actually bound (useful when a port was given as 0).
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    pub ext_proc: SocketAddr,
    pub health: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
}

/// Loads the scheduler config the flags select.
pub fn load_config(flags: &Flags) -> Result<EndpointPickerConfig, ConfigError> {
    match (&flags.config_file, &flags.config_text) {
        (Some(path), _) => EndpointPickerConfig::load(path),
        (None, Some(text)) => EndpointPickerConfig::parse(text),
        (None, None) => EndpointPickerConfig::builtin(),
    }
}

/// Kubernetes discovery's settings, from the flags.
fn target_settings(flags: &Flags) -> TargetSettings {
    TargetSettings {
        pool_name: flags.pool_name.clone(),
        pool_group: flags.pool_group.clone(),
        endpoint_selector: flags.endpoint_selector.clone(),
        endpoint_target_ports: flags.endpoint_target_ports.clone(),
    }
}

/// Discovery's KV-event settings (what endpoints may override), from the flags.
fn kv_events_settings(flags: &Flags) -> KvEventsSettings {
    let f = &flags.kv_events;
    KvEventsSettings {
        enabled: f.enabled,
        port: f.port,
        replay_port: f.replay_port,
        topic: f.topic.clone(),
        ranks: f.dp_ranks,
    }
}

/// Runs the picker until `shutdown` resolves. `bound` receives the listening
/// addresses once every port is bound.
pub async fn run(
    flags: Flags,
    tracer: RequestTracer,
    shutdown: impl Future<Output = ()> + Send,
    bound: Option<tokio::sync::oneshot::Sender<BoundAddrs>>,
) -> Result<(), ServerError> {
    let cfg = load_config(&flags)?;
    let (core, scraper) = Core::build(&flags, &cfg)?;
    let listeners = Listeners::bind(&flags).await?;
    let addrs = listeners.addrs();
    tracing::info!(ext_proc = %addrs.ext_proc, health = %addrs.health, metrics = %addrs.metrics,
        admin = %addrs.admin, tls = flags.secure_serving, config = ?flags.config_file,
        tokenizers = core.tokenizers.len(), "endpoint picker listening");
    if !addrs.admin.ip().is_loopback() {
        tracing::warn!(admin = %addrs.admin, "the admin API (pod addresses, scores, Explain) is reachable beyond localhost without authentication");
    }
    let tls = tls_setup(&flags)?;

    let (stop_tx, stop) = watch::channel(false);
    let kube = start_discovery(&flags, &core, &stop).await?;
    start_kv_events(&flags, &core, &stop)?;
    let leader = start_leader_election(&flags, &core, kube.as_ref(), &stop);
    let Listeners {
        ext_proc,
        health,
        admin,
        metrics,
    } = listeners;
    let metrics_auth = metrics_auth(&flags, kube.as_ref())?;
    start_background(
        &flags,
        &core,
        scraper,
        tls.as_ref(),
        (metrics, metrics_auth),
        &stop,
    )?;
    let servers = start_servers(
        &flags,
        &core,
        tls,
        ServerListeners {
            ext_proc,
            health,
            admin,
        },
        tracer,
        leader.rx,
        &stop,
    )?;

    if let Some(tx) = bound {
        let _ = tx.send(addrs);
    }
    shutdown.await;
    drain(&flags, stop_tx, servers, leader.task).await;
    Ok(())
}

/// What every server and task shares.
struct Core {
    store: Arc<EndpointStore>,
    index: Arc<PrefixIndex>,
    director: Arc<Director>,
    registry: Registry,
    pool_name: String,
    echo_served: bool,
    /// The served models' tokenizers (`--tokenizer`, `--tokenizers-dir`),
    /// for token-exact prefix keys.
    tokenizers: Arc<Tokenizers>,
}

impl Core {
    /// The store, index, scheduler, director and scraper, and the metrics
    /// registry with every collector that does not depend on discovery.
    fn build(flags: &Flags, cfg: &EndpointPickerConfig) -> Result<(Self, Scraper), ServerError> {
        let pool_name = flags
            .pool_name
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let store = Arc::new(EndpointStore::new(flags.metrics_staleness_threshold));
        let index = Arc::new(PrefixIndex::new());
        let tokenizers = Arc::new(Tokenizers::load(&flags.tokenizer)?);
        let scheduler = build_scheduler(
            cfg,
            &SchedulerOptions {
                fallback_endpoints: flags.fallback_endpoints,
                max_scrape_failures: flags.max_scrape_failures,
                staleness: flags.metrics_staleness_threshold,
                epoch: store.epoch(),
                kv_events: flags.kv_events.enabled,
            },
            Arc::clone(&index),
        )?;
        // GIE's conformance verifier plugin is this same echo.
        let echo_served = flags.echo_served_endpoint
            || scheduler.has_filter_type("header-based-testing-filter")
            || cfg
                .plugin_of_type("destination-endpoint-served-verifier")
                .is_some();
        let mut scrape_settings = ScrapeSettings::from_config(
            cfg,
            flags.model_server_metrics_scheme.as_deref(),
            flags.model_server_metrics_path.as_deref(),
            flags.model_server_metrics_port,
        )?;
        scrape_settings.name_filter = flags.metrics_name_filter;
        let scraper = Scraper::new(
            Arc::clone(&store),
            scrape_settings,
            ScraperOptions {
                interval: flags.refresh_metrics_interval,
                timeout: flags.metrics_scrape_timeout,
                max_failures: flags.max_scrape_failures.max(1),
            },
        );

        let registry = Registry::new();
        let request_metrics = Arc::new(RequestMetrics::new(&registry)?);
        register_build_info(&registry)?;
        let mut director = Director::new(Arc::clone(&store), scheduler, cfg, request_metrics)
            .with_tokenizers(Arc::clone(&tokenizers));
        if let Some(settings) = FlowControlSettings::from_config(cfg)? {
            let flow =
                FlowController::new(settings, director.pool_capacity(), &registry, &pool_name)?;
            tracing::info!(settings = ?flow.settings(), "flow control on");
            director = director.with_flow_control(flow);
        }
        if cfg.slo_admission.is_some() {
            director = director.with_slo_admission(Arc::new(SloAdmission::new(&registry)?));
            tracing::info!("SLO admission on ({SLO_TTFT_HEADER})");
        }
        let director = Arc::new(director);
        let core = Self {
            store,
            index,
            director,
            registry,
            pool_name,
            echo_served,
            tokenizers,
        };
        core.register(PoolMetrics::new(Arc::clone(&core.store), &core.pool_name))?;
        core.register(IndexMetrics::new(Arc::clone(&core.index)))?;
        core.register(ScrapeMetrics::new(scraper.stats()))?;
        Ok((core, scraper))
    }

    fn register<C: prometheus::core::Collector + 'static>(
        &self,
        collector: Result<C, prometheus::Error>,
    ) -> Result<(), ServerError> {
        let register = |c| self.registry.register(Box::new(c));
        collector
            .and_then(register)
            .map_err(|e| ServerError::Telemetry(e.into()))
    }
}
struct Listeners {
    ext_proc: Listener,
    health: Listener,
    admin: Listener,
    metrics: Listener,
}

impl Listeners {
    async fn bind(flags: &Flags) -> Result<Self, BindError> {
        let addr = |port| SocketAddr::new(flags.listen_address, port);
        Ok(Self {
            ext_proc: Listener::bind(addr(flags.grpc_port), "ext_proc").await?,
            health: Listener::bind(addr(flags.grpc_health_port), "health").await?,
            admin: Listener::bind(
                SocketAddr::new(flags.admin_address, flags.admin_port),
                "admin",
            )
            .await?,
            metrics: Listener::bind(addr(flags.metrics_port), "metrics").await?,
        })
    }

    fn addrs(&self) -> BoundAddrs {
        BoundAddrs {
            ext_proc: self.ext_proc.local_addr(),
            health: self.health.local_addr(),
            admin: self.admin.local_addr(),
            metrics: self.metrics.local_addr(),
        }
    }
}

fn tls_setup(flags: &Flags) -> Result<Option<TlsSetup>, TlsError> {
    if !flags.secure_serving {
        return Ok(None);
    }
    let key = match &flags.cert_path {
        Some(dir) => tls::load_dir(dir)?,
        None => tls::self_signed()?,
    };
    TlsSetup::new(key).map(Some)
}

/// The Kubernetes client, when discovery or leader election needs one.
struct Kube {
    client: kube::Client,
    stats: Arc<DiscoveryStats>,
    target: Option<Target>,
}

/// Starts the discovery source the flags select and registers its metrics.
async fn start_discovery(
    flags: &Flags,
    core: &Core,
    stop: &watch::Receiver<bool>,
) -> Result<Option<Kube>, ServerError> {
    let target = Target::from_settings(&target_settings(flags))?;
    let kube = if (flags.endpoints_file.is_none() && target.is_some())
        || flags.ha_enable_leader_election
    {
        let stats = Arc::new(DiscoveryStats::default());
        let client = kube_discovery::client(&stats).await?;
        Some(Kube {
            client,
            stats,
            target,
        })
    } else {
        None
    };
    let source = if let Some(path) = &flags.endpoints_file {
        let d = FileDiscovery::new(
            path.clone(),
            flags.endpoints_file_poll_interval,
            Arc::clone(&core.store),
        )
        .with_kv_events(kv_events_settings(flags));
        tokio::spawn(d.run(stop.clone()));
        DiscoverySource::File(Arc::clone(&core.store))
    } else if let Some(Kube {
        client,
        stats,
        target: Some(target),
    }) = &kube
    {
        let director = Arc::clone(&core.director);
        let rewrite_director = Arc::clone(&core.director);
        let mut options = KubeDiscoveryOptions::new(flags.pool_namespace.clone(), target.clone());
        options.kv_events = kv_events_settings(flags);
        let d = KubeDiscovery::new(
            client.clone(),
            options,
            Arc::clone(&core.store),
            Arc::clone(stats),
        )
        .with_objectives(Arc::new(move |objectives| {
            director.set_dynamic_objectives(objectives)
        }))
        .with_rewrites(Arc::new(move |rules| {
            rewrite_director.set_dynamic_rewrites(&rewrite_specs(&rules))
        }));
        let stop = stop.clone();
        tokio::spawn(async move {
            if let Err(e) = d.run(stop).await {
                tracing::error!(error = %chain(&e), "Kubernetes discovery stopped; keeping the last endpoints");
            }
        });
        DiscoverySource::Kube
    } else {
        return Err(ServerError::NoDiscovery);
    };
    let stats = kube.as_ref().map(|k| Arc::clone(&k.stats));
    core.register(DiscoveryMetrics::new(source, stats))?;
    Ok(kube)
}

/// With `--kv-events`: the subscription supervisor, on its own thread with a
/// single-threaded runtime (as the scraper), and its metrics. It stops every
/// subscription when `stop` turns true.
fn start_kv_events(
    flags: &Flags,
    core: &Core,
    stop: &watch::Receiver<bool>,
) -> Result<(), ServerError> {
    let f = &flags.kv_events;
    if !f.enabled {
        return Ok(());
    }
    core.register(KvEventsMetrics::new(
        Arc::clone(&core.store),
        &core.pool_name,
    ))?;
    let supervisor = Supervisor::new(
        Arc::clone(&core.store),
        SupervisorSettings {
            max_blocks_per_rank: f.max_blocks_per_rank,
            handshake_timeout: f.handshake_timeout,
            max_message: usize::try_from(f.max_message_bytes).unwrap_or(usize::MAX),
            capacity_interval: Duration::from_secs(1),
        },
    );
    let start = |source| ServerError::Start {
        what: "KV-event supervisor",
        source,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(start)?;
    let stop = stop.clone();
    std::thread::Builder::new()
        .name("epp-kv-events".into())
        .spawn(move || rt.block_on(supervisor.run(stop)))
        .map_err(start)?;
    Ok(())
}

/// InferenceModelRewrite rules as the director's rewrite entries, in the
/// same order (one entry per named model, `*` for a rule matching any).
fn rewrite_specs(rules: &[RewriteRule]) -> Vec<ModelRewriteSpec> {
    let targets = |r: &RewriteRule| -> Vec<RewriteTarget> {
        r.targets
            .iter()
            .map(|(model, weight)| RewriteTarget {
                model: model.clone(),
                weight: *weight,
            })
            .collect()
    };
    let mut specs = Vec::new();
    for rule in rules {
        if rule.models.is_empty() {
            specs.push(ModelRewriteSpec {
                model: "*".to_owned(),
                targets: targets(rule),
            });
        }
        for model in &rule.models {
            specs.push(ModelRewriteSpec {
                model: model.clone(),
                targets: targets(rule),
            });
        }
    }
    specs
}

/// Readiness' leader input, and the elector's task when there is one.
struct Leadership {
    rx: watch::Receiver<bool>,
    task: Option<JoinHandle<()>>,
    /// Without an elector the sender is kept (unused) until `run` returns,
    /// so readiness' leader input stays open.
    _keep: Option<watch::Sender<bool>>,
}

fn start_leader_election(
    flags: &Flags,
    core: &Core,
    kube: Option<&Kube>,
    stop: &watch::Receiver<bool>,
) -> Leadership {
    // Without leader election every replica serves; with it, none does
    // until it holds the lease.
    let (tx, rx) = watch::channel(!flags.ha_enable_leader_election);
    match kube {
        Some(k) if flags.ha_enable_leader_election => {
            let lease_key = k
                .target
                .as_ref()
                .map_or_else(|| core.pool_name.clone(), Target::lease_key);
            let elector = LeaderElector::new(
                k.client.clone(),
                LeaderElectionConfig::new(&flags.pool_namespace, &lease_key),
                Arc::clone(&k.stats),
            );
            Leadership {
                rx,
                task: Some(tokio::spawn(elector.run(tx, stop.clone()))),
                _keep: None,
            }
        }
        _ => Leadership {
            rx,
            task: None,
            _keep: Some(tx),
        },
    }
}

/// Who may read /metrics: `--metrics-auth-token-file` when given, else the
/// Kubernetes API when the picker has a client (Kubernetes discovery or
/// leader election), else nobody checks, said at startup.
fn metrics_auth(
    flags: &Flags,
    kube: Option<&Kube>,
) -> Result<Option<Arc<MetricsAuth>>, ServerError> {
    if !flags.metrics_endpoint_auth {
        if flags.metrics_auth_token_file.is_some() {
            tracing::warn!("--metrics-auth-token-file is ignored: --metrics-endpoint-auth=false");
        }
        tracing::info!("/metrics is served without authentication (--metrics-endpoint-auth=false)");
        return Ok(None);
    }
    if let Some(path) = &flags.metrics_auth_token_file {
        let auth = MetricsAuth::token_file(path.clone())?;
        tracing::info!(file = %path.display(), "/metrics requires the bearer token in --metrics-auth-token-file");
        return Ok(Some(Arc::new(auth)));
    }
    if let Some(k) = kube {
        tracing::info!(
            "/metrics requires a bearer token allowed to get /metrics (TokenReview and SubjectAccessReview)"
        );
        return Ok(Some(Arc::new(MetricsAuth::kubernetes(k.client.clone()))));
    }
    tracing::warn!(
        "/metrics is served WITHOUT authentication: --metrics-endpoint-auth checks tokens with the \
         Kubernetes API, which the picker does not use with --endpoints-file; give \
         --metrics-auth-token-file to require a token, or --metrics-endpoint-auth=false to say \
         this is intended"
    );
    Ok(None)
}

/// Scraping, index upkeep, the metrics server and certificate reloads.
fn start_background(
    flags: &Flags,
    core: &Core,
    scraper: Scraper,
    tls: Option<&TlsSetup>,
    (metrics, metrics_auth): (Listener, Option<Arc<MetricsAuth>>),
    stop: &watch::Receiver<bool>,
) -> Result<(), ServerError> {
    spawn_scraper(scraper, stop.clone())?;
    tokio::spawn(prune_index(
        Arc::clone(&core.store),
        Arc::clone(&core.index),
        stop.clone(),
    ));
    if let Some(flow) = core.director.flow_control() {
        tokio::spawn(Arc::clone(flow).run_ticker(stop.clone()));
    }
    tokio::spawn(serve_metrics(
        metrics,
        core.registry.clone(),
        metrics_auth,
        stop.clone(),
    ));
    if let (Some(tls), true, Some(dir)) = (tls, flags.enable_cert_reload, &flags.cert_path) {
        tokio::spawn(
            tls.clone()
                .reload_loop(dir.clone(), Duration::from_secs(5), stop.clone()),
        );
    }
    Ok(())
}

struct Servers {
    ext_proc: JoinHandle<Result<(), tonic::transport::Error>>,
    health: JoinHandle<Result<(), tonic::transport::Error>>,
    admin: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// The listeners of the gRPC servers.
struct ServerListeners {
    ext_proc: Listener,
    health: Listener,
    admin: Listener,
}

/// The health server (plaintext and open: the kubelet and the gateway probe
/// it), the admin server (localhost by default: it shows pod addresses and
/// scores) and the ext_proc server (which also answers health checks, for
/// gateways that probe the ext_proc port).
fn start_servers(
    flags: &Flags,
    core: &Core,
    tls: Option<TlsSetup>,
    listeners: ServerListeners,
    tracer: RequestTracer,
    leader: watch::Receiver<bool>,
    stop: &watch::Receiver<bool>,
) -> Result<Servers, ServerError> {
    let ServerListeners {
        ext_proc,
        health,
        admin,
    } = listeners;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(readiness_loop(
        reporter,
        Arc::clone(&core.store),
        ReadinessInputs {
            leader,
            shutdown: stop.clone(),
            kv_events_timeout: flags
                .kv_events
                .enabled
                .then_some(flags.kv_events.ready_timeout),
        },
    ));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::admin::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let health = tokio::spawn(
        Server::builder()
            .add_service(health_service.clone())
            .serve_with_incoming_shutdown(health, wait_stop(stop.clone())),
    );
    let admin = tokio::spawn(
        Server::builder()
            .add_service(health_service.clone())
            .add_service(AdminServer::new(AdminService::new(Arc::clone(
                &core.director,
            ))))
            .add_service(reflection)
            .serve_with_incoming_shutdown(admin, wait_stop(stop.clone())),
    );

    let stream_settings = StreamSettings {
        max_request_body: usize::try_from(flags.max_request_body_bytes).unwrap_or(usize::MAX),
        echo_served_endpoint: core.echo_served,
        always_want_response_body: flags.response_processing == ResponseProcessing::Full,
        honour_subset_hint: !flags.disable_endpoint_subset_filter,
        tracer,
    };
    let ext_builder = Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(H2_WINDOW))
        .initial_connection_window_size(Some(H2_WINDOW))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(
            ExtProcService::new(Arc::clone(&core.director), stream_settings).into_server(),
        );
    let ext_proc = match tls {
        Some(tls) => tokio::spawn(ext_builder.serve_with_incoming_shutdown(
            tls.incoming(ext_proc, stop.clone()),
            wait_stop(stop.clone()),
        )),
        None => tokio::spawn(
            ext_builder.serve_with_incoming_shutdown(ext_proc, wait_stop(stop.clone())),
        ),
    };
    Ok(Servers {
        ext_proc,
        health,
        admin,
    })
}

/// Readiness off, listeners closed, in-flight streams given the grace
/// period, the lease released.
async fn drain(
    flags: &Flags,
    stop: watch::Sender<bool>,
    servers: Servers,
    leader_task: Option<JoinHandle<()>>,
) {
    tracing::info!(grace = ?flags.shutdown_grace_period, "shutting down: readiness off, draining in-flight streams");
    stop.send_replace(true);
    match tokio::time::timeout(flags.shutdown_grace_period, servers.ext_proc).await {
        Ok(Ok(Err(e))) => {
            tracing::warn!(error = %chain(&e), "ext_proc server ended with an error")
        }
        Ok(_) => {}
        Err(_) => tracing::warn!("grace period over; closing remaining streams"),
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = tokio::join!(servers.health, servers.admin);
    })
    .await;
    if let Some(task) = leader_task {
        // The elector releases the lease as soon as shutdown begins; this
        // only makes sure the release request finished before exiting.
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    tracing::info!("stopped");
}

/// Runs the scraper on its own thread with a single-threaded runtime.
///
/// Scraping is thousands of tiny I/O bursts per second on a large pool; on
/// the shared multi-threaded runtime every burst wakes and parks worker
/// threads, which cost more CPU than the scrapes, and competes with request
/// handling. One dedicated thread handles a whole round without handing
/// work across threads.
fn spawn_scraper(scraper: Scraper, stop: watch::Receiver<bool>) -> Result<(), ServerError> {
    let start = |source| ServerError::Start {
        what: "scraper",
        source,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(start)?;
    std::thread::Builder::new()
        .name("epp-scraper".into())
        .spawn(move || rt.block_on(scraper.run(stop)))
        .map_err(start)?;
    Ok(())
}

async fn wait_stop(mut rx: watch::Receiver<bool>) {
    let _ = crate::shutdown::requested(&mut rx).await;
}

/// Drops index entries of endpoints that left the pool.
async fn prune_index(
    store: Arc<EndpointStore>,
    index: Arc<PrefixIndex>,
    mut stop: watch::Receiver<bool>,
) {
    let mut changes = store.subscribe();
    loop {
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = crate::shutdown::requested(&mut stop) => return,
        }
        index.retain_live(&store.snapshot());
    }
}
