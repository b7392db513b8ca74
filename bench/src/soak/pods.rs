//! Model-server pods as separate `vllm-sim` processes, one pod each, so a
//! pod can die the way a crashed container does (SIGKILL: no graceful
//! close, in-flight connections reset) and come back on the same address,
//! which is what the gateway and the picker know it by.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::SoakError;
use crate::stack::Proc;

/// Ports below the kernel's ephemeral range, so no outgoing connection
/// (Envoy's, the picker's scrapes) can be holding a killed pod's port when
/// it restarts on it.
const PORT_LOW: u16 = 20_000;
const PORT_SPAN: u16 = 12_000;

/// One pod: its address for life, and its process while it is up.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub addr: SocketAddr,
    proc_: Option<Proc>,
    /// Starts so far (the log file of each is kept apart).
    incarnations: usize,
}

/// How every pod process is started.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub sim_bin: PathBuf,
    /// `vllm-sim` flags after `--pods 1 --base-port P --pod-name-prefix`.
    pub sim_args: Vec<String>,
    pub log_dir: PathBuf,
}

impl Pod {
    pub fn is_up(&self) -> bool {
        self.proc_.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc_.as_ref().map(Proc::pid)
    }

    /// SIGKILL (std's `Child::kill`, through the process guard's drop) and
    /// reap the process.
    pub fn kill(&mut self) {
        self.proc_.take();
    }

    /// Starts the pod's process on its address and waits until it serves.
    /// The port may still be taken for a moment after a kill (a socket the
    /// kernel is closing), so a failed bind is retried a few times.
    pub async fn start(&mut self, spec: &PodSpec) -> Result<(), SoakError> {
        let mut last = None;
        for _attempt in 0..5 {
            self.incarnations += 1;
            let log = spec
                .log_dir
                .join(format!("{}-{}.log", self.name, self.incarnations));
            match start_process(spec, &self.name, self.addr.port(), &log).await {
                Ok(p) => {
                    self.proc_ = Some(p);
                    return Ok(());
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| SoakError::Pod(format!("{} did not start", self.name))))
    }
}

async fn start_process(
    spec: &PodSpec,
    name: &str,
    port: u16,
    log: &Path,
) -> Result<Proc, SoakError> {
    let mut cmd = Command::new(&spec.sim_bin);
    // The single pod is named `<prefix>0`; the prefix makes names unique.
    cmd.args(["--pods", "1", "--base-port", &port.to_string()])
        .args(["--host", "127.0.0.1"])
        .arg("--pod-name-prefix")
        .arg(name.strip_suffix('0').unwrap_or(name))
        .args(&spec.sim_args)
        .env("RUST_LOG", "warn,vllm_sim=info");
    let mut p = Proc::spawn(cmd, "vllm-sim", log.to_path_buf())?;
    p.wait_for_line("vllm-sim ready").await?;
    Ok(p)
}

/// `n` pods on free loopback ports, not started yet. Names are
/// `pod<i>-0` (`vllm-sim` appends the index of its only pod).
pub fn allocate(n: usize) -> Result<Vec<Pod>, SoakError> {
    let mut pods = Vec::with_capacity(n);
    // A random start keeps concurrent runs (tests) from probing the same ports.
    let mut port = PORT_LOW + fastrand::u16(..PORT_SPAN);
    let mut tried = 0u32;
    while pods.len() < n {
        tried += 1;
        if tried > u32::from(PORT_SPAN) {
            return Err(SoakError::Pod(format!(
                "no {n} free ports in {PORT_LOW}..{}",
                PORT_LOW + PORT_SPAN
            )));
        }
        port = PORT_LOW + (port + 1 - PORT_LOW) % PORT_SPAN;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // Free now; the pod binds it right after (a race another program
        // could win, which then fails the pod's start with a clear error).
        if TcpListener::bind(addr).is_ok() {
            pods.push(Pod {
                name: format!("pod{}-0", pods.len()),
                addr,
                proc_: None,
                incarnations: 0,
            });
        }
    }
    Ok(pods)
}
