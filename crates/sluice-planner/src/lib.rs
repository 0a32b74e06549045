//! The streaming SQL front end of Sluice.
//!
//! The entry points of this crate are [`parse_script`] (a Sluice SQL script
//! into [`Statement`]s), [`StreamTable`] (a stream as a DataFusion table whose
//! scan yields the current micro-batch) and [`check_streaming_plan`] (whether
//! a query can run incrementally, and a clear error when it cannot).
//!
//! ```
//! use sluice_planner::{parse_script, Statement};
//! let stmts = parse_script(
//!     "CREATE SOURCE clicks (user_id BIGINT, ts TIMESTAMP) WITH (connector = 'memory');
//!      CREATE SINK out WITH (connector = 'memory') AS SELECT user_id FROM clicks WHERE user_id > 0;",
//! ).unwrap();
//! assert!(matches!(stmts[0], Statement::CreateSource(_)));
//! assert!(matches!(stmts[1], Statement::CreateSink(_)));
//! ```

pub mod explain;
pub mod parser;
pub mod retract;
pub mod stream_table;
pub mod validate;
pub mod windows;

pub use explain::{explain_streaming, fingerprint};
pub use parser::{CreateSink, CreateSource, Statement, WatermarkDef, parse_script};
pub use retract::{
    SIGN, SIGN_PLACEHOLDER, distinct_on_as_row_number, is_sign_placeholder, sign_updating_edges,
};
pub use stream_table::{BatchSlot, StreamTable, fork_streams, is_stream_scan, stream_tables};
pub use validate::{AggregateShape, OutputMode, PlanShape, WINDOW_END, check_streaming_plan};
pub use windows::{
    SESSION_END, SessionEnd, WINDOW_END_FN, WINDOW_TIME_FN, WITHIN_WATERMARK_FN, rewrite_windows,
    window_time_udf, window_udfs, within_watermark_udf,
};
