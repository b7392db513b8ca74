//! Wiring: builds every component from the flags and runs the three servers
//! (ext_proc, health/admin, metrics) and the background tasks (discovery,
//! leader election, scraping, prefix-index upkeep, readiness) until shutdown.
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

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};
use tonic::transport::Server;

use crate::{
    admin::{
        AdminService,
        health::{ReadinessInputs, readiness_loop},
        pb::admin_server::AdminServer,
        tls::{self, TlsError, TlsSetup},
    },
    config::{ConfigError, EndpointPickerConfig, Flags, ResponseProcessing},
    director::Director,
    discovery::{
        FileDiscovery,
        kube::{
            self as kube_discovery, DiscoveryStats, KubeDiscovery, KubeDiscoveryError,
            KubeDiscoveryOptions, LeaderElectionConfig, LeaderElector, Target, TargetSettings,
        },
    },
    endpoints::EndpointStore,
    extproc::{ExtProcService, StreamSettings},
    prefix::PrefixIndex,
    scheduling::{BuildError, SchedulerOptions, build_scheduler},
    scrape::{ScrapeSettings, Scraper, ScraperOptions, SettingsError},
    telemetry::{Metrics, TelemetryError, serve_metrics},
};

/// Flow-control window, per stream and per connection, on the ext_proc
/// listener (see where it is set).
const H2_WINDOW: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("scheduler config: {0}")]
    Scheduler(#[from] BuildError),
    #[error("metrics scraping config: {0}")]
    Scrape(#[from] SettingsError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "no discovery configured: give --endpoints-file, --pool-name, or --endpoint-selector with --endpoint-target-ports"
    )]
    NoDiscovery,
    #[error("discovery: {0}")]
    Discovery(String),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Addresses actually bound (useful when a port was given as 0).
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    pub ext_proc: SocketAddr,
    pub health: SocketAddr,
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

async fn bind(flags: &Flags, port: u16) -> Result<TcpListener, ServerError> {
    let addr = SocketAddr::new(flags.listen_address, port);
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// Runs the picker until `shutdown` resolves. `bound` receives the listening
/// addresses once every port is bound.
pub async fn run(
    flags: Flags,
    shutdown: impl Future<Output = ()> + Send,
    bound: Option<tokio::sync::oneshot::Sender<BoundAddrs>>,
) -> Result<(), ServerError> {
    let cfg = load_config(&flags)?;
    let pool_name = flags
        .pool_name
        .clone()
        .unwrap_or_else(|| "default".to_owned());

    let store = Arc::new(EndpointStore::new(flags.metrics_staleness_threshold));
    let index = Arc::new(PrefixIndex::new());
    let scheduler = build_scheduler(
        &cfg,
        &SchedulerOptions {
            fallback_endpoints: flags.fallback_endpoints,
            max_scrape_failures: flags.max_scrape_failures,
            staleness: flags.metrics_staleness_threshold,
            epoch: store.epoch(),
        },
        Arc::clone(&index),
    )?;
    let echo_served =
        flags.echo_served_endpoint || scheduler.has_filter_type("header-based-testing-filter");
    let mut scrape_settings = ScrapeSettings::from_config(
        &cfg,
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
    let metrics = Arc::new(Metrics::new(&pool_name)?.with_sources(
        Arc::clone(&store),
        Arc::clone(&index),
        scraper.stats(),
    ));
    let director = Arc::new(Director::new(
        Arc::clone(&store),
        scheduler,
        &cfg,
        Arc::clone(&metrics),
    ));
    let tls = if flags.secure_serving {
        let key = match &flags.cert_path {
            Some(dir) => tls::load_dir(dir)?,
            None => tls::self_signed()?,
        };
        Some(TlsSetup::new(key)?)
    } else {
        None
    };

    let ext_listener = bind(&flags, flags.grpc_port).await?;
    let health_listener = bind(&flags, flags.grpc_health_port).await?;
    let metrics_listener = bind(&flags, flags.metrics_port).await?;
    let addrs = BoundAddrs {
        ext_proc: local(&ext_listener),
        health: local(&health_listener),
        metrics: local(&metrics_listener),
    };
    tracing::info!(ext_proc = %addrs.ext_proc, health = %addrs.health, metrics = %addrs.metrics,
        tls = flags.secure_serving, config = ?flags.config_file, "endpoint picker listening");

    let (stop_tx, stop_rx) = watch::channel(false);
    // Without leader election every replica serves; with it, none does until
    // it holds the lease.
    let (leader_tx, leader_rx) = watch::channel(!flags.ha_enable_leader_election);

    // Discovery and leader election.
    let discovery_error = |e: KubeDiscoveryError| {
        ServerError::Discovery(crate::telemetry::logging::chain(&e).to_string())
    };
    let kube_target = Target::from_settings(&target_settings(&flags)).map_err(discovery_error)?;
    let kube = if (flags.endpoints_file.is_none() && kube_target.is_some())
        || flags.ha_enable_leader_election
    {
        let stats = Arc::new(DiscoveryStats::default());
        metrics.attach_discovery(Arc::clone(&stats));
        let client = kube_discovery::client(&stats)
            .await
            .map_err(discovery_error)?;
        Some((client, stats))
    } else {
        None
    };
    if let Some(path) = &flags.endpoints_file {
        let d = FileDiscovery::new(
            path.clone(),
            flags.endpoints_file_poll_interval,
            Arc::clone(&store),
        );
        tokio::spawn(d.run(stop_rx.clone()));
    } else if let (Some(target), Some((client, stats))) = (kube_target.clone(), &kube) {
        let objectives_director = Arc::clone(&director);
        let d = KubeDiscovery::new(
            client.clone(),
            KubeDiscoveryOptions::new(flags.pool_namespace.clone(), target),
            Arc::clone(&store),
            Arc::clone(stats),
        )
        .with_objectives(Arc::new(move |objectives| {
            objectives_director.set_dynamic_objectives(objectives)
        }));
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            if let Err(e) = d.run(stop).await {
                tracing::error!(error = %e, "Kubernetes discovery stopped; keeping the last endpoints");
            }
        });
    } else {
        return Err(ServerError::NoDiscovery);
    }
    // Without an elector the sender is kept (unused) until `run` returns, so
    // readiness' leader input stays open.
    let (leader_task, _leader_tx) = match &kube {
        Some((client, stats)) if flags.ha_enable_leader_election => {
            let lease_key = kube_target
                .as_ref()
                .map_or_else(|| pool_name.clone(), Target::lease_key);
            let elector = LeaderElector::new(
                client.clone(),
                LeaderElectionConfig::new(&flags.pool_namespace, &lease_key),
                Arc::clone(stats),
            );
            (
                Some(tokio::spawn(elector.run(leader_tx, stop_rx.clone()))),
                None,
            )
        }
        _ => (None, Some(leader_tx)),
    };

    spawn_scraper(scraper, stop_rx.clone())?;
    tokio::spawn(prune_index(
        Arc::clone(&store),
        Arc::clone(&index),
        stop_rx.clone(),
    ));
    tokio::spawn(serve_metrics(
        metrics_listener,
        Arc::clone(&metrics),
        stop_rx.clone(),
    ));
    if let (Some(tls), true, Some(dir)) = (&tls, flags.enable_cert_reload, &flags.cert_path) {
        tokio::spawn(
            tls.clone()
                .reload_loop(dir.clone(), Duration::from_secs(5), stop_rx.clone()),
        );
    }

    let (reporter, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(readiness_loop(
        reporter,
        Arc::clone(&store),
        ReadinessInputs {
            leader: leader_rx,
            shutdown: stop_rx.clone(),
        },
    ));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::admin::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Discovery(format!("reflection: {e}")))?;

    let stream_settings = StreamSettings {
        max_request_body: usize::try_from(flags.max_request_body_bytes).unwrap_or(usize::MAX),
        echo_served_endpoint: echo_served,
        always_want_response_body: flags.response_processing == ResponseProcessing::Full,
        honour_subset_hint: !flags.disable_endpoint_subset_filter,
    };
    let ext_proc = ExtProcService::new(Arc::clone(&director), stream_settings).into_server();

    let admin_server = Server::builder()
        .add_service(health_service.clone())
        .add_service(AdminServer::new(AdminService::new(Arc::clone(&director))))
        .add_service(reflection)
        .serve_with_incoming_shutdown(
            tokio_stream_listener(health_listener),
            wait_stop(stop_rx.clone()),
        );
    let admin_task = tokio::spawn(admin_server);

    let ext_builder = Server::builder()
        .tcp_nodelay(true)
        // HTTP/2 flow-control windows of 1 MiB (hyper's defaults, set here
        // so the choice is visible). With 16 MiB for the connection, Envoy
        // pushed every in-flight body at once: at 64 concurrent 220 KiB
        // requests the picker held 47 MiB and routed 76-81% of what the
        // no-op server did; with 1 MiB, 94-96% (bench/results/perf.md 4a).
        .initial_stream_window_size(Some(H2_WINDOW))
        .initial_connection_window_size(Some(H2_WINDOW))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(ext_proc);
    let ext_task = match tls {
        Some(tls) => tokio::spawn(ext_builder.serve_with_incoming_shutdown(
            ChannelIncoming(tls.incoming(ext_listener, stop_rx.clone())),
            wait_stop(stop_rx.clone()),
        )),
        None => tokio::spawn(ext_builder.serve_with_incoming_shutdown(
            tokio_stream_listener(ext_listener),
            wait_stop(stop_rx.clone()),
        )),
    };

    if let Some(tx) = bound {
        let _ = tx.send(addrs);
    }

    shutdown.await;
    tracing::info!(grace = ?flags.shutdown_grace_period, "shutting down: readiness off, draining in-flight streams");
    stop_tx.send_replace(true);
    match tokio::time::timeout(flags.shutdown_grace_period, ext_task).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "ext_proc server ended with an error"),
        Ok(_) => {}
        Err(_) => tracing::warn!("grace period over; closing remaining streams"),
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), admin_task).await;
    if let Some(task) = leader_task {
        // The elector releases the lease as soon as shutdown begins; this
        // only makes sure the release request finished before exiting.
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Runs the scraper on its own thread with a single-threaded runtime.
///
/// Scraping is thousands of tiny I/O bursts per second on a large pool; on
/// the shared multi-threaded runtime every burst wakes and parks worker
/// threads, which cost more CPU than the scrapes, and competes with request
/// handling. One dedicated thread handles a whole round without handing
/// work across threads.
fn spawn_scraper(scraper: Scraper, stop: watch::Receiver<bool>) -> Result<(), ServerError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ServerError::Discovery(format!("scraper runtime: {e}")))?;
    std::thread::Builder::new()
        .name("epp-scraper".into())
        .spawn(move || rt.block_on(scraper.run(stop)))
        .map_err(|e| ServerError::Discovery(format!("scraper thread: {e}")))?;
    Ok(())
}

fn local(l: &TcpListener) -> SocketAddr {
    l.local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
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

/// Plain TCP connections with TCP_NODELAY, as a stream for tonic.
fn tokio_stream_listener(listener: TcpListener) -> TcpIncoming {
    TcpIncoming {
        listener,
        backoff: None,
    }
}

/// Accepted connections for tonic. After a failed accept (out of file
/// descriptors, typically) it waits [`crate::telemetry::log_limit::ACCEPT_BACKOFF`]
/// before the next one: tonic retries at once, which would spin a core for as
/// long as the condition lasts.
struct TcpIncoming {
    listener: TcpListener,
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl futures_util::Stream for TcpIncoming {
    type Item = Result<tokio::net::TcpStream, std::io::Error>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(sleep) = self.backoff.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.backoff = None;
        }
        match self.listener.poll_accept(cx) {
            Poll::Ready(Ok((s, _))) => {
                let _ = s.set_nodelay(true);
                Poll::Ready(Some(Ok(s)))
            }
            Poll::Ready(Err(e)) => {
                self.backoff = Some(Box::pin(tokio::time::sleep(
                    crate::telemetry::log_limit::ACCEPT_BACKOFF,
                )));
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Adapts the TLS acceptor's channel to a stream for tonic.
struct ChannelIncoming<T>(mpsc::Receiver<T>);

impl<T> futures_util::Stream for ChannelIncoming<T> {
    type Item = T;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}
