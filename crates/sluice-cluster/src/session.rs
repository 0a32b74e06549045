//! The DataFusion session every part of a cluster plans and decodes with:
//! Ballista's settings, Sluice's functions and the codec for plan nodes.

use std::sync::Arc;

use ballista_core::extension::SessionConfigExt;
use datafusion::execution::{FunctionRegistry, SessionState, SessionStateBuilder};
use datafusion::prelude::SessionConfig;
use datafusion_proto::physical_plan::PhysicalExtensionCodec;

/// The codec for plan nodes that DataFusion's own serialization does not
/// know: Ballista's (its shuffle and stage nodes) and Sluice's
/// ([`crate::codec::SluiceCodec`]).
pub fn physical_codec() -> Arc<dyn PhysicalExtensionCodec> {
    Arc::new(crate::codec::SluiceCodec::default())
}

/// The session config of a cluster's parts: Ballista's defaults, with
/// Sluice's codec.
pub fn session_config() -> SessionConfig {
    SessionConfig::new_with_ballista()
        .with_ballista_physical_extension_codec(physical_codec())
        // A batch's job's own keys (`sluice.*`), known to every part.
        .with_option_extension(crate::rollback::SluiceJobOptions::default())
        // As in one process (StreamContext): a run-time filter derived from
        // one batch's rows must never prune another's.
        .set_bool("datafusion.optimizer.enable_dynamic_filter_pushdown", false)
}

/// A session over `config` that knows Sluice's functions (window start and
/// end, `window_time`, ...), which plans name and executors look up.
pub fn session_state(config: SessionConfig) -> SessionState {
    let mut state = SessionStateBuilder::new()
        .with_default_features()
        .with_config(config)
        .build();
    for udf in sluice_planner::window_udfs() {
        // Registering replaces a function of the same name; none is lost.
        let _ = state.register_udf(Arc::new(udf));
    }
    state
}
