//! Configuration: command-line flags and the scheduler config file.

mod flags;
mod picker_config;

pub use flags::{Flags, LogFormat, ResponseProcessing, parse_bytes, parse_duration};
pub use picker_config::{
    ACCEPTED_API_VERSIONS, ConfigError, DEFAULT_CONFIG, EndpointPickerConfig, GIE_DEFAULT_CONFIG,
    ModelRewriteSpec, ObjectiveSpec, PluginRef, PluginSpec, ProfilePluginRef, ProfileSpec,
    RewriteTarget,
};
