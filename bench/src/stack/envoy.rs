//! Rendering of the repository's Envoy template (envoy/envoy.yaml.tmpl and
//! its parts) for the local stack, the benchmarks and the tests.

use std::{fs, io, net::SocketAddr, path::Path};

/// How Envoy sends request (and response) bodies to the picker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    FullDuplex,
    Buffered,
}

/// What the rendered Envoy does.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// Port of the picker's ext_proc server.
    pub epp_port: u16,
    /// Ports of further picker replicas: cluster "epp" then lists every
    /// replica and Envoy balances ext_proc streams over them round robin
    /// (its default policy), one stream per request.
    pub extra_epp_ports: Vec<u16>,
    /// Talk TLS (ALPN h2) to the picker.
    pub epp_tls: bool,
    pub body_mode: BodyMode,
    /// Model-server endpoints of the upstream cluster.
    pub pool: Vec<SocketAddr>,
    /// No ext_proc filter: plain round robin over the pool (what a
    /// Kubernetes Service does), unless `client_routes` is set.
    pub without_epp: bool,
    /// With `without_epp`: keep the override_host policy, so a client that
    /// sets `x-gateway-destination-endpoint` itself picks the endpoint (the
    /// gateway-alone baseline of the overhead benchmark).
    pub client_routes: bool,
    /// Extra HTTP filters placed before ext_proc (YAML list items indented at
    /// 10 spaces).
    pub extra_filters: String,
    /// Send response bodies to the picker (otherwise only when it asks per
    /// request with a mode override).
    pub response_bodies: bool,
    /// ext_proc `failure_mode_allow`: when the picker cannot be reached,
    /// true lets requests through unrouted (the override_host policy's
    /// round-robin fallback picks), false fails them (GIE's FailOpen and
    /// FailClose).
    pub failure_mode_allow: bool,
    /// Listener and admin ports; 0 lets Envoy pick.
    pub listen_port: u16,
    pub admin_port: u16,
}

impl EnvoyOptions {
    pub fn new(epp_port: u16, pool: Vec<SocketAddr>) -> Self {
        Self {
            epp_port,
            extra_epp_ports: Vec::new(),
            epp_tls: false,
            body_mode: BodyMode::FullDuplex,
            pool,
            without_epp: false,
            client_routes: false,
            extra_filters: String::new(),
            response_bodies: true,
            failure_mode_allow: false,
            listen_port: 0,
            admin_port: 0,
        }
    }
}

fn part(dir: &Path, name: &str) -> io::Result<String> {
    Ok(fs::read_to_string(dir.join("parts").join(name))?
        .trim_end()
        .to_owned())
}

/// Renders `envoy_dir/envoy.yaml.tmpl` for `opts`.
pub fn render(envoy_dir: &Path, opts: &EnvoyOptions) -> io::Result<String> {
    let template = fs::read_to_string(envoy_dir.join("envoy.yaml.tmpl"))?;
    let (body_mode, trailer_mode) = match opts.body_mode {
        BodyMode::FullDuplex => ("FULL_DUPLEX_STREAMED", "SEND"),
        BodyMode::Buffered => ("BUFFERED", "SKIP"),
    };
    let (response_body_mode, response_trailer_mode) = if opts.response_bodies {
        (body_mode, trailer_mode)
    } else {
        ("NONE", "SKIP")
    };
    let endpoints: String = opts
        .pool
        .iter()
        .map(|a| {
            format!(
                "        - endpoint:\n            address:\n              socket_address: {{address: {}, port_value: {}}}\n",
                a.ip(),
                a.port()
            )
        })
        .collect();
    let ext_proc = if opts.without_epp {
        String::new()
    } else {
        part(envoy_dir, "ext-proc-filter.yaml")?
    };
    let tls = if opts.epp_tls {
        part(envoy_dir, "epp-tls.yaml")?
    } else {
        String::new()
    };
    let template = with_epp_replicas(template, &opts.extra_epp_ports)?;
    let lb = part(
        envoy_dir,
        if opts.without_epp && !opts.client_routes {
            "round-robin-lb.yaml"
        } else {
            "override-host-lb.yaml"
        },
    )?;
    Ok(template
        .replace("{{EXT_PROC_FILTER}}", &ext_proc)
        .replace("{{EXTRA_FILTERS}}", opts.extra_filters.trim_end())
        .replace("{{EPP_TLS}}", &tls)
        .replace(
            "{{FAILURE_MODE_ALLOW}}",
            if opts.failure_mode_allow {
                "true"
            } else {
                "false"
            },
        )
        .replace("{{POOL_LB}}", &lb)
        .replace("{{POOL_ENDPOINTS}}", endpoints.trim_end())
        .replace("{{RESPONSE_BODY_MODE}}", response_body_mode)
        .replace("{{RESPONSE_TRAILER_MODE}}", response_trailer_mode)
        .replace("{{BODY_MODE}}", body_mode)
        .replace("{{TRAILER_MODE}}", trailer_mode)
        .replace("{{ADMIN_PORT}}", &opts.admin_port.to_string())
        .replace("{{LISTEN_PORT}}", &opts.listen_port.to_string())
        .replace("{{EPP_PORT}}", &opts.epp_port.to_string()))
}

/// The picker's endpoint in the template's "epp" cluster.
const EPP_ENDPOINT: &str = "        - endpoint:\n            address:\n              socket_address: {address: 127.0.0.1, port_value: {{EPP_PORT}}}\n";

/// The template with one "epp" cluster endpoint per extra replica after the
/// first one's.
fn with_epp_replicas(template: String, extra: &[u16]) -> io::Result<String> {
    if extra.is_empty() {
        return Ok(template);
    }
    if !template.contains(EPP_ENDPOINT) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "envoy.yaml.tmpl: the epp cluster's endpoint is not where picker replicas are added",
        ));
    }
    let mut endpoints = EPP_ENDPOINT.to_owned();
    for port in extra {
        endpoints.push_str(&EPP_ENDPOINT.replace("{{EPP_PORT}}", &port.to_string()));
    }
    Ok(template.replacen(EPP_ENDPOINT, &endpoints, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envoy_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../envoy")
    }

    #[test]
    fn renders_every_placeholder() {
        let pool = vec![
            "127.0.0.1:8000".parse().unwrap(),
            "127.0.0.1:8001".parse().unwrap(),
        ];
        for (tls, without, buffered, bodies) in [
            (false, false, false, true),
            (true, false, true, false),
            (false, true, false, true),
        ] {
            let mut o = EnvoyOptions::new(9002, pool.clone());
            o.epp_tls = tls;
            o.without_epp = without;
            o.response_bodies = bodies;
            if buffered {
                o.body_mode = BodyMode::Buffered;
            }
            let text = render(&envoy_dir(), &o).unwrap();
            assert!(!text.contains("{{"), "unfilled placeholder:\n{text}");
            assert_eq!(text.contains("envoy.filters.http.ext_proc"), !without);
            assert_eq!(text.contains("UpstreamTlsContext"), tls);
            assert!(text.contains("port_value: 8001"));
        }
    }

    #[test]
    fn lists_every_picker_replica_in_the_epp_cluster() {
        let mut o = EnvoyOptions::new(9002, vec!["127.0.0.1:8000".parse().unwrap()]);
        o.extra_epp_ports = vec![9003, 9004];
        let text = render(&envoy_dir(), &o).unwrap();
        let epp = &text[text.find("- name: epp").unwrap()..text.find("- name: pool").unwrap()];
        for port in [9002, 9003, 9004] {
            assert!(epp.contains(&format!("port_value: {port}}}")), "{epp}");
        }
        assert_eq!(epp.matches("- endpoint:").count(), 3);
        assert!(!epp.contains("lb_policy"), "round robin, Envoy's default");
    }
}
