//! The DataFrame API on the demo's click files: read a directory as a
//! stream, transform it with ordinary DataFusion DataFrame methods, and hand
//! each micro-batch to a Rust callback.
//!
//! Run with `cargo run -p sluice --example dataframe`.

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::functions::string::expr_fn::upper;
use sluice::prelude::*;

#[tokio::main]
async fn main() -> sluice::Result<()> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Int64, true),
        Field::new("url", DataType::Utf8, true),
        Field::new("ms_on_page", DataType::Int64, true),
        Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, None), true),
    ]));
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/data/clicks");

    let ctx = StreamContext::new();
    let clicks = ctx
        .read_stream(
            FileSource::json(dir)
                .name("clicks")
                .schema(schema)
                .max_files_per_trigger(1),
        )
        .await?
        .with_watermark("ts", Duration::from_secs(10))?;

    let long_reads = clicks
        .filter(col("ms_on_page").gt_eq(lit(1000)))?
        .select(vec![
            col("ts"),
            col("user_id"),
            upper(col("url")).alias("url"),
            (col("ms_on_page") / lit(1000)).alias("seconds"),
        ])?;

    let checkpoint = std::env::temp_dir().join(format!("sluice-example-{}", std::process::id()));
    let query = long_reads
        .write_stream()
        .trigger(Trigger::AvailableNow)
        .checkpoint(&checkpoint)
        .start(ForeachBatchSink::new("print", |batch_id, rows| {
            println!("batch {batch_id}:\n{}", pretty_format_batches(rows)?);
            Ok(())
        }))
        .await?;
    query.await_termination().await?;

    for p in query.recent_progress() {
        println!(
            "batch {}: {} rows in, {} rows out, {:.2} ms, watermark {:?}",
            p.batch_id,
            p.input_rows,
            p.output_rows,
            p.durations_ms.get("total").copied().unwrap_or_default(),
            p.watermark_ms
        );
    }
    let _ = std::fs::remove_dir_all(checkpoint);
    Ok(())
}
