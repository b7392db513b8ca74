//! The endpoint-picker containers of a rendered install, and their command
//! line read by the picker's own flag parser.

use std::collections::BTreeMap;

use clap::Parser;
use epp::config::Flags;
use serde_json::Value;

use crate::model::{Obj, Workload, args, arr_at, find, str_at, workloads};

/// An EPP container: one whose args name a pool or a standalone selector.
pub struct EppContainer<'a> {
    pub workload: Workload<'a>,
    pub container: &'a Value,
}

impl<'a> EppContainer<'a> {
    pub fn args(&self) -> Vec<&'a str> {
        args(self.container)
    }

    pub fn name(&self) -> String {
        format!(
            "{}/{} container {}",
            crate::model::kind(self.workload.obj),
            crate::model::name(self.workload.obj),
            str_at(self.container, "/name").unwrap_or("?")
        )
    }

    /// Values of `$(VAR)` references the kubelet would expand: literal env
    /// values as they are, downward-API and other sources as a stand-in
    /// (their value is only known in the cluster).
    fn env(&self) -> BTreeMap<&'a str, String> {
        arr_at(self.container, "/env")
            .iter()
            .filter_map(|e| {
                let name = str_at(e, "/name")?;
                let value = str_at(e, "/value")
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("from-{name}"));
                Some((name, value))
            })
            .collect()
    }

    /// The args with `$(VAR)` expanded as the kubelet does.
    pub fn expanded_args(&self) -> Vec<String> {
        let env = self.env();
        self.args()
            .into_iter()
            .map(|a| {
                let mut s = a.to_owned();
                for (k, v) in &env {
                    s = s.replace(&format!("$({k})"), v);
                }
                s
            })
            .collect()
    }

    /// The flags as the picker parses them; Err carries clap's message.
    pub fn flags(&self) -> Result<Flags, String> {
        let argv = std::iter::once("epp".to_owned()).chain(self.expanded_args());
        Flags::try_parse_from(argv).map_err(|e| e.to_string())
    }

    /// The value of `--name VALUE` or `--name=VALUE` as written.
    pub fn arg_value(&self, flag: &str) -> Option<&'a str> {
        arg_value(&self.args(), flag)
    }

    /// Whether leader election is switched on (`--ha-enable-leader-election`
    /// bare or `=true`), read with the picker's own parser when possible.
    pub fn leader_election(&self) -> bool {
        match self.flags() {
            Ok(f) => f.ha_enable_leader_election,
            Err(_) => self.args().iter().any(|a| {
                *a == "--ha-enable-leader-election" || *a == "--ha-enable-leader-election=true"
            }),
        }
    }

    /// The text of the file `--config-file` names, read from the ConfigMap
    /// volume mounted over its directory. Err says why it cannot be found.
    pub fn config_text(&self, objs: &'a [Obj]) -> Result<Option<&'a str>, String> {
        let Some(path) = self.arg_value("--config-file") else {
            return Ok(None);
        };
        let mount = arr_at(self.container, "/volumeMounts")
            .iter()
            .filter_map(|m| Some((str_at(m, "/mountPath")?, str_at(m, "/name")?)))
            .filter(|(dir, _)| {
                path.strip_prefix(dir)
                    .is_some_and(|rest| rest.starts_with('/'))
            })
            .max_by_key(|(dir, _)| dir.len())
            .ok_or_else(|| format!("--config-file {path} is not under any volumeMount"))?;
        let (dir, volume) = mount;
        let key = &path[dir.len() + 1..];
        let vol = arr_at(self.workload.pod_spec(), "/volumes")
            .iter()
            .find(|v| str_at(v, "/name") == Some(volume))
            .ok_or_else(|| format!("volume {volume} is mounted but not declared"))?;
        let cm_name = str_at(vol, "/configMap/name")
            .ok_or_else(|| format!("volume {volume} holding --config-file is not a ConfigMap"))?;
        // `items` remaps keys to paths.
        let key = arr_at(vol, "/configMap/items")
            .iter()
            .find(|i| str_at(i, "/path") == Some(key))
            .and_then(|i| str_at(i, "/key"))
            .unwrap_or(key);
        let cm = find(objs, "ConfigMap", cm_name, self.workload.namespace()).ok_or_else(|| {
            format!("ConfigMap {cm_name} (holding --config-file) is not in the output")
        })?;
        str_at(
            cm,
            &format!("/data/{}", key.replace('~', "~0").replace('/', "~1")),
        )
        .map(Some)
        .ok_or_else(|| format!("ConfigMap {cm_name} has no key {key} for --config-file {path}"))
    }
}

/// `--flag VALUE` or `--flag=VALUE`.
pub fn arg_value<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        if *a == flag {
            args.get(i + 1).copied()
        } else {
            a.strip_prefix(flag).and_then(|r| r.strip_prefix('='))
        }
    })
}

pub fn epp_containers(objs: &[Obj]) -> Vec<EppContainer<'_>> {
    let mut out = Vec::new();
    for w in workloads(objs) {
        for c in w.containers() {
            let a = args(c);
            let is_epp = a.iter().any(|a| {
                ["--pool-name", "--endpoint-selector"]
                    .iter()
                    .any(|f| *a == *f || a.starts_with(&format!("{f}=")))
            });
            if is_epp {
                out.push(EppContainer {
                    workload: Workload {
                        obj: w.obj,
                        template: w.template,
                    },
                    container: c,
                });
            }
        }
    }
    out
}
