//! The `WITH (connector = ...)` factory for sources.

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use serde_json::Value;
use sluice_common::connector::Source;
use sluice_common::{Error, Options, Result};

use crate::{FileSource, MemorySource, NexmarkSource, RateSource};

/// Builds a source from a `CREATE SOURCE` statement's columns and options.
///
/// `schema` is `None` when the statement declared no columns.
pub fn source_from_options(
    name: &str,
    schema: Option<SchemaRef>,
    options: &Options,
) -> Result<Arc<dyn Source>> {
    let connector = options.get("connector").ok_or_else(|| {
        Error::plan(format!(
            "source '{name}' needs WITH (connector = 'memory' | 'file' | 'rate' | 'nexmark' | 'kafka', ...)"
        ))
    })?;
    let need_schema = || {
        schema.clone().ok_or_else(|| {
            Error::plan(format!(
                "source '{name}' ({connector}) needs its columns declared: CREATE SOURCE {name} (col TYPE, ...)"
            ))
        })
    };
    match connector.to_ascii_lowercase().as_str() {
        "memory" => {
            options.check_known(&["connector", "max_rows_per_trigger"])?;
            let mut s = MemorySource::new(name, need_schema()?);
            if let Some(n) = options.get_usize("max_rows_per_trigger")? {
                s = s.with_max_rows_per_trigger(n);
            }
            Ok(Arc::new(s))
        }
        "file" => Ok(Arc::new(FileSource::from_options(
            name,
            need_schema()?,
            options,
        )?)),
        "rate" => Ok(Arc::new(RateSource::from_options(name, schema, options)?)),
        "nexmark" => Ok(Arc::new(NexmarkSource::from_options(
            name, schema, options,
        )?)),
        #[cfg(feature = "kafka")]
        "kafka" => Ok(Arc::new(crate::KafkaSource::from_options(
            name, schema, options,
        )?)),
        other => Err(Error::plan(format!(
            "source '{name}': unknown connector '{other}' (known: memory, file, rate, nexmark, kafka)"
        ))),
    }
}

/// Reads one part of a range another process described
/// ([`sluice_common::connector::SourceReader::remote_read`]): what a
/// cluster's executor does with the parts the driver sends.
pub async fn read_part(
    config: &Value,
    schema: SchemaRef,
    part: &Value,
) -> Result<sluice_common::connector::ReadBatch> {
    match config.get("connector").and_then(Value::as_str) {
        Some("file") => crate::file_source::read_part(config, schema, part).await,
        #[cfg(feature = "kafka")]
        Some("kafka") => crate::kafka::source::read_part(config, schema, part).await,
        other => Err(Error::not_supported(format!(
            "reading a {} source's range on this process (a connector this build of Sluice lacks?)",
            other.unwrap_or("unnamed")
        ))),
    }
}

/// Reads a `u64` offset, naming the source when it is not one.
pub(crate) fn offset_u64(source: &str, v: &Value) -> Result<u64> {
    v.as_u64().ok_or_else(|| {
        Error::internal(format!(
            "source '{source}': offset {v} is not a row or file count"
        ))
    })
}
