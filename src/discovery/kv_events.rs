//! Where each endpoint publishes its KV-cache events: the flags' values,
//! overridden per endpoint by the endpoints file (`kvEvents:`) or by pod
//! annotations (`epp/kv-events-*`).
//!
//! Resolution, per endpoint: nothing when events are off (`--kv-events`
//! not given) or the endpoint turns them off; otherwise each field is the
//! endpoint's own value when it gives one, else the flag's. Discovery sources
//! resolve as they build each [`EndpointSpec`], so an endpoint whose event
//! settings change is a changed spec, and the supervisor restarts its
//! subscriptions.
//!
//! Ports: data-parallel rank `r` publishes on `port + r` and replays on
//! `replayPort + r` (vLLM's convention). A Kubernetes pod serving several
//! target ports runs one engine per port; the engine of the `i`-th target
//! port is taken to publish on `port + i * ranks + r`, so the engines of one
//! pod never share a port.
//!
//! [`EndpointSpec`]: crate::endpoints::EndpointSpec

use crate::endpoints::KvEventsSpec;

/// Most data-parallel ranks one endpoint may declare (one subscription each).
pub const MAX_RANKS: u16 = 256;

/// Pod annotation: `"false"` turns events off for the pod, `"true"` leaves
/// them to the flags.
pub const KV_EVENTS_ANNOTATION: &str = "epp/kv-events";
/// Pod annotation: the PUB port of rank 0.
pub const KV_EVENTS_PORT_ANNOTATION: &str = "epp/kv-events-port";
/// Pod annotation: the replay ROUTER port of rank 0 (`0`: no replay).
pub const KV_EVENTS_REPLAY_PORT_ANNOTATION: &str = "epp/kv-events-replay-port";
/// Pod annotation: the topic prefix to subscribe to.
pub const KV_EVENTS_TOPIC_ANNOTATION: &str = "epp/kv-events-topic";
/// Pod annotation: data-parallel ranks (one publisher each).
pub const KV_EVENTS_RANKS_ANNOTATION: &str = "epp/kv-events-ranks";

/// The flags' values: discovery's own copy, so it does not depend on the
/// command line (as [`TargetSettings`](super::kube::TargetSettings)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEventsSettings {
    /// `--kv-events`.
    pub enabled: bool,
    /// `--kv-events-port`.
    pub port: u16,
    /// `--kv-events-replay-port`; 0 for none.
    pub replay_port: u16,
    /// `--kv-events-topic`.
    pub topic: String,
    /// `--kv-events-dp-ranks`.
    pub ranks: u16,
}

impl Default for KvEventsSettings {
    /// Off, with vLLM's conventional ports.
    fn default() -> Self {
        Self {
            enabled: false,
            port: 5557,
            replay_port: 5558,
            topic: String::new(),
            ranks: 1,
        }
    }
}

/// What one endpoint says about its events; every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvEventsOverride {
    pub enabled: Option<bool>,
    pub port: Option<u16>,
    /// `Some(0)`: no replay for this endpoint.
    pub replay_port: Option<u16>,
    pub topic: Option<String>,
    pub ranks: Option<u16>,
}

impl KvEventsOverride {
    /// Reads the `epp/kv-events*` annotations. A value that does not parse
    /// is ignored (the flag's value applies), as GIE ignores a bad
    /// active-ports entry; `invalid` collects the names of those ignored.
    pub fn from_annotations<'a>(
        get: impl Fn(&str) -> Option<&'a str>,
        invalid: &mut Vec<&'static str>,
    ) -> Self {
        let mut num = |key: &'static str| {
            get(key).and_then(|v| match v.trim().parse::<u16>() {
                Ok(n) => Some(n),
                Err(_) => {
                    invalid.push(key);
                    None
                }
            })
        };
        let port = num(KV_EVENTS_PORT_ANNOTATION).filter(|&p| p > 0);
        let replay_port = num(KV_EVENTS_REPLAY_PORT_ANNOTATION);
        let ranks = num(KV_EVENTS_RANKS_ANNOTATION);
        let enabled = get(KV_EVENTS_ANNOTATION).and_then(|v| match v.trim() {
            "true" => Some(true),
            "false" => Some(false),
            _ => {
                invalid.push(KV_EVENTS_ANNOTATION);
                None
            }
        });
        Self {
            enabled,
            port,
            replay_port,
            topic: get(KV_EVENTS_TOPIC_ANNOTATION).map(str::to_owned),
            ranks,
        }
    }
}

impl KvEventsSettings {
    /// The settings of an endpoint, `offset` ports above the flags' (the
    /// engine index on a multi-port pod times the ranks; 0 otherwise).
    /// `None` when events are off for it; an error says which value cannot
    /// work (ranks out of range, ports past 65535).
    pub fn resolve(
        &self,
        o: &KvEventsOverride,
        offset: u16,
    ) -> Result<Option<KvEventsSpec>, String> {
        if !self.enabled || o.enabled == Some(false) {
            return Ok(None);
        }
        let ranks = o.ranks.unwrap_or(self.ranks);
        if !(1..=MAX_RANKS).contains(&ranks) {
            return Err(format!(
                "kvEvents ranks {ranks} is out of range 1-{MAX_RANKS}"
            ));
        }
        let span = |base: u16, what: &str| -> Result<u16, String> {
            let first = base
                .checked_add(offset)
                .filter(|p| p.checked_add(ranks - 1).is_some())
                .ok_or_else(|| format!("kvEvents {what} {base} with {ranks} ranks passes 65535"))?;
            Ok(first)
        };
        let port = span(o.port.unwrap_or(self.port), "port")?;
        let replay = match o.replay_port.unwrap_or(self.replay_port) {
            0 => None,
            p => Some(span(p, "replayPort")?),
        };
        Ok(Some(KvEventsSpec {
            port,
            replay_port: replay,
            topic: o.topic.clone().unwrap_or_else(|| self.topic.clone()),
            ranks,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn on() -> KvEventsSettings {
        KvEventsSettings {
            enabled: true,
            ..KvEventsSettings::default()
        }
    }

    #[test]
    fn flags_give_the_defaults_and_an_endpoint_overrides_each_field() {
        let s = on();
        let spec = s.resolve(&KvEventsOverride::default(), 0).unwrap().unwrap();
        assert_eq!(
            spec,
            KvEventsSpec {
                port: 5557,
                replay_port: Some(5558),
                topic: String::new(),
                ranks: 1
            }
        );
        let o = KvEventsOverride {
            port: Some(6000),
            topic: Some("kv@".into()),
            ..Default::default()
        };
        let spec = s.resolve(&o, 0).unwrap().unwrap();
        assert_eq!((spec.port, spec.replay_port), (6000, Some(5558)));
        assert_eq!(spec.topic, "kv@");
        let o = KvEventsOverride {
            replay_port: Some(0),
            ranks: Some(4),
            ..Default::default()
        };
        let spec = s.resolve(&o, 2).unwrap().unwrap();
        assert_eq!((spec.port, spec.replay_port, spec.ranks), (5559, None, 4));
    }

    #[test]
    fn off_by_flag_or_by_endpoint() {
        let o = KvEventsOverride {
            port: Some(6000),
            ..Default::default()
        };
        assert_eq!(KvEventsSettings::default().resolve(&o, 0), Ok(None));
        let off = KvEventsOverride {
            enabled: Some(false),
            ..o
        };
        assert_eq!(on().resolve(&off, 0), Ok(None));
    }

    #[test]
    fn impossible_values_say_why() {
        let s = on();
        for (o, needle) in [
            (
                KvEventsOverride {
                    ranks: Some(0),
                    ..Default::default()
                },
                "out of range",
            ),
            (
                KvEventsOverride {
                    port: Some(65535),
                    ranks: Some(2),
                    ..Default::default()
                },
                "passes 65535",
            ),
        ] {
            let e = s.resolve(&o, 0).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn annotations_parse_and_bad_values_are_ignored() {
        let a = BTreeMap::from([
            (KV_EVENTS_PORT_ANNOTATION, "7000"),
            (KV_EVENTS_REPLAY_PORT_ANNOTATION, "x"),
            (KV_EVENTS_TOPIC_ANNOTATION, "kv@10.0.0.1:8000@m"),
            (KV_EVENTS_RANKS_ANNOTATION, "2"),
            (KV_EVENTS_ANNOTATION, "true"),
        ]);
        let mut invalid = Vec::new();
        let o = KvEventsOverride::from_annotations(|k| a.get(k).copied(), &mut invalid);
        assert_eq!(invalid, vec![KV_EVENTS_REPLAY_PORT_ANNOTATION]);
        assert_eq!(
            o,
            KvEventsOverride {
                enabled: Some(true),
                port: Some(7000),
                replay_port: None,
                topic: Some("kv@10.0.0.1:8000@m".into()),
                ranks: Some(2),
            }
        );
        let off = BTreeMap::from([(KV_EVENTS_ANNOTATION, "false")]);
        let o = KvEventsOverride::from_annotations(|k| off.get(k).copied(), &mut invalid);
        assert_eq!(on().resolve(&o, 0), Ok(None));
    }
}
