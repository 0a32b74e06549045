//! Sluice: a micro-batch stream-processing engine on Apache Arrow and
//! Apache DataFusion.
//!
//! The entry point of this crate is [`StreamContext`]. A stream is an
//! unbounded table: read it with [`StreamContext::read_stream`] (a DataFusion
//! `DataFrame` whose scan yields the current micro-batch) or declare it in SQL
//! with `CREATE SOURCE`; every trigger, Sluice runs the query's physical plan
//! over the rows that arrived since the last batch and writes the result to a
//! sink, with a checkpoint that makes the output exactly-once across crashes.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> sluice::Result<()> {
//! use std::sync::Arc;
//! use sluice::prelude::*;
//!
//! let ctx = StreamContext::new();
//! ctx.sql("CREATE SOURCE clicks (user_id BIGINT, url VARCHAR) WITH (connector = 'memory');
//!          INSERT INTO clicks VALUES (1, '/a'), (2, '/b'), (1, '/c');").await?;
//!
//! let clicks = ctx.session().table("clicks").await?;
//! let ones = clicks.filter(col("user_id").eq(lit(1)))?.select(vec![col("url")])?;
//! let table = MemoryTable::new();
//! let query = ones
//!     .write_stream()
//!     .trigger(Trigger::Manual)
//!     .start(MemorySink::new("ones", Arc::clone(&table)))
//!     .await?;
//! query.process_all_available().await?;
//! assert_eq!(table.to_batch()?.unwrap().num_rows(), 2);
//! assert_eq!(query.last_progress().unwrap().input_rows, 3);
//! # Ok(())
//! # }
//! ```

pub mod context;
pub mod dataframe;
pub mod http;
pub mod memory_table;
mod state_table;

pub use context::{Outcome, PendingQuery, Settings, StreamContext};
pub use dataframe::{DataStreamWriter, PlannedState, StreamingDataFrame};
pub use sluice_common::connector::{DeadLetter, OnError, Sink, Source};
pub use sluice_common::durable::Durability;
pub use sluice_common::{BatchId, Clock, Error, ManualClock, Progress, Result, SystemClock};
pub use sluice_connectors::{
    ConsoleSink, FileSink, FileSource, ForeachBatchSink, KafkaSink, KafkaSource, MemorySink,
    MemorySource, MemoryTable, RateSource,
};
pub use sluice_exec::{
    Fault, FaultPoint, OperatorRun, PlanRunner, QueryInfo, QueryStatus, RunOutput, StateFinalizer,
    StreamingQuery, Trigger,
};
pub use sluice_planner::{OutputMode, WatermarkDef};
pub use state_table::{other_operators, read_aggregate_state};

/// The crates Sluice is built on, for types not re-exported here.
pub mod deps {
    pub use datafusion;
    pub use sluice_common;
    pub use sluice_connectors;
    pub use sluice_exec;
    pub use sluice_planner;
    pub use sluice_state;
}

/// What most programs import.
pub mod prelude {
    pub use crate::{
        ConsoleSink, FileSink, FileSource, ForeachBatchSink, MemorySink, MemorySource, MemoryTable,
        OutputMode, RateSource, StreamContext, StreamingDataFrame, Trigger,
    };
    pub use datafusion::prelude::{col, lit};
}
