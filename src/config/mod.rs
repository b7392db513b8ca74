//! Configuration: command-line flags and the scheduler config file.

mod flags;
mod kv_events_flags;
mod picker_config;
mod tokenizer_flags;

pub use flags::{
    Flags, IGNORED_FLAGS, LogFormat, ResponseProcessing, ignored_flags, parse_bytes, parse_duration,
};
pub use kv_events_flags::{DEFAULT_MAX_BLOCKS_PER_RANK, KvEventsFlags};
pub use picker_config::{
    ACCEPTED_API_VERSIONS, ConfigError, DEFAULT_CONFIG, EndpointPickerConfig, GIE_DEFAULT_CONFIG,
    MODEL_REWRITE_HEADER, ModelRewriteSpec, ObjectiveSpec, PluginRef, PluginSpec, ProfilePluginRef,
    ProfileSpec, RewriteTarget, SloAdmissionSpec, TEST_SELECTION_HEADER, TRUSTABLE_HEADERS,
};
pub use tokenizer_flags::{TokenizerFlags, TokenizerSpec};
