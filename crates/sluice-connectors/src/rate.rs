//! A generator of `(timestamp, value)` rows at a fixed rate, for demos.
//!
//! Row `i` has `value = i` and `timestamp = start + i * 1000 / rows_per_second`
//! ms, where `start` is fixed when a query first opens the source and kept in
//! its checkpoint; how many rows exist is decided by the trigger clock. So a
//! range of offsets always yields the same rows.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Int64Array, TimestampMillisecondArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use serde_json::Value;
use sluice_common::durable;
use sluice_common::{Clock, Error, Options, Result};

use sluice_common::connector::{ReadBatch, Source, SourceContext, SourceReader};

use crate::source::offset_u64;

/// Emits `rows_per_second` rows per second of the trigger clock.
#[derive(Debug, Clone)]
pub struct RateSource {
    name: String,
    rows_per_second: u64,
    max_rows_per_trigger: Option<u64>,
    schema: SchemaRef,
}

impl RateSource {
    /// A rate source named `name`.
    pub fn new(name: impl Into<String>, rows_per_second: u64) -> Self {
        RateSource {
            name: name.into(),
            rows_per_second: rows_per_second.max(1),
            max_rows_per_trigger: None,
            schema: Self::fixed_schema(),
        }
    }

    /// The schema every rate source has: `timestamp TIMESTAMP, value BIGINT`.
    pub fn fixed_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new(
                "timestamp",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ),
            Field::new("value", DataType::Int64, false),
        ]))
    }

    /// Builds the source from `CREATE SOURCE ... WITH (connector = 'rate', ...)`.
    pub fn from_options(
        name: &str,
        declared: Option<SchemaRef>,
        options: &Options,
    ) -> Result<Self> {
        options.check_known(&["connector", "rows_per_second", "max_rows_per_trigger"])?;
        let rps = options.get_usize("rows_per_second")?.unwrap_or(1);
        if rps == 0 {
            return Err(Error::plan(format!(
                "{}: rows_per_second must be at least 1",
                options.owner()
            )));
        }
        let mut s = RateSource::new(name, rps as u64);
        s.max_rows_per_trigger = options
            .get_usize("max_rows_per_trigger")?
            .map(|n| n.max(1) as u64);
        if let Some(d) = declared {
            let names: Vec<_> = d
                .fields()
                .iter()
                .map(|f| f.name().to_ascii_lowercase())
                .collect();
            if names != ["timestamp", "value"] {
                return Err(Error::plan(format!(
                    "rate source '{name}' always has the columns (timestamp TIMESTAMP, value BIGINT); declare those or none"
                )));
            }
        }
        Ok(s)
    }
}

impl Source for RateSource {
    fn name(&self) -> &str {
        &self.name
    }
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
    fn connector(&self) -> &str {
        "rate"
    }
    fn open(&self, ctx: SourceContext) -> Result<Box<dyn SourceReader>> {
        let path = ctx.dir.join("start");
        let start_ms = if path.exists() {
            durable::read_json::<i64>(&path)?
        } else {
            let now = ctx.clock.now_millis();
            durable::write_json(&path, &now, ctx.durability)?;
            now
        };
        Ok(Box::new(RateReader {
            source: self.clone(),
            start_ms,
            clock: ctx.clock,
            due: 0,
        }))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[derive(Debug)]
struct RateReader {
    source: RateSource,
    start_ms: i64,
    clock: Arc<dyn Clock>,
    /// Rows due by the clock at the last `latest_offset`.
    due: u64,
}

impl RateReader {
    /// The time of row `i`.
    fn row_ms(&self, i: u64) -> i64 {
        self.start_ms + (i as i128 * 1000 / self.source.rows_per_second as i128) as i64
    }
}

#[async_trait]
impl SourceReader for RateReader {
    fn initial_offset(&self) -> Value {
        Value::from(0u64)
    }

    async fn latest_offset(&mut self, start: &Value) -> Result<Value> {
        let start = offset_u64(&self.source.name, start)?;
        let elapsed = (self.clock.now_millis() - self.start_ms).max(0) as u128;
        let available = (elapsed * self.source.rows_per_second as u128 / 1000) as u64;
        self.due = available;
        let end = match self.source.max_rows_per_trigger {
            Some(cap) => available.min(start + cap),
            None => available,
        };
        Ok(Value::from(end.max(start)))
    }

    async fn backlog(&mut self, end: &Value) -> Result<Option<u64>> {
        let end = offset_u64(&self.source.name, end)?;
        Ok(Some(self.due.saturating_sub(end)))
    }

    async fn read(&mut self, start: &Value, end: &Value) -> Result<ReadBatch> {
        let (s, e) = (
            offset_u64(&self.source.name, start)?,
            offset_u64(&self.source.name, end)?,
        );
        let rps = self.source.rows_per_second as i128;
        let values: Vec<i64> = (s..e).map(|i| i as i64).collect();
        let ts: Vec<i64> = (s..e)
            .map(|i| self.start_ms + (i as i128 * 1000 / rps) as i64)
            .collect();
        let batch = RecordBatch::try_new(
            Arc::clone(&self.source.schema),
            vec![
                Arc::new(TimestampMillisecondArray::from(ts)),
                Arc::new(Int64Array::from(values)),
            ],
        )?;
        Ok(ReadBatch {
            batches: vec![batch],
            // Row `i` is due once `i + 1` rows are (see `latest_offset`).
            available_ms: (e > s).then(|| self.row_ms(s + 1)),
            ..ReadBatch::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_common::ManualClock;
    use sluice_common::durable::Durability;
    use std::time::Duration;

    #[tokio::test]
    async fn rows_follow_the_manual_clock_and_replay_identically() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(10_000);
        let ctx = SourceContext {
            dir: dir.path().into(),
            durability: Durability::NoSync,
            clock: Arc::new(clock.clone()),
        };
        let src = RateSource::new("r", 4);
        let mut r = src.open(ctx.clone()).unwrap();
        assert_eq!(
            r.latest_offset(&Value::from(0)).await.unwrap(),
            Value::from(0)
        );
        clock.advance(Duration::from_millis(1_500));
        assert_eq!(
            r.latest_offset(&Value::from(0)).await.unwrap(),
            Value::from(6)
        );
        let a = r.read(&Value::from(2), &Value::from(6)).await.unwrap();
        let mut again = src.open(ctx).unwrap();
        let b = again.read(&Value::from(2), &Value::from(6)).await.unwrap();
        assert_eq!(a.batches, b.batches);
        let ts = a.batches[0]
            .column(0)
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .unwrap();
        assert_eq!(ts.value(0), 10_500);
    }
}
