//! Any bytes as a JSON, CSV (with and without header, two delimiters) or
//! Parquet file of a fixed schema: rows and named bad records, never a panic.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use sluice_connectors::datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use sluice_connectors::decode::{Format, decode};

fuzz_target!(|data: &[u8]| {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("name", DataType::Utf8, true),
        Field::new("price", DataType::Float64, true),
        Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
        Field::new("ok", DataType::Boolean, true),
    ]));
    let bytes = bytes::Bytes::copy_from_slice(data);
    for format in [
        Format::Json,
        Format::Csv {
            header: true,
            delimiter: b',',
        },
        Format::Csv {
            header: false,
            delimiter: b';',
        },
        Format::Parquet,
    ] {
        let decoded = decode(&format, &schema, bytes.clone());
        for b in &decoded.batches {
            assert_eq!(b.schema(), schema, "rows come out in the declared schema");
        }
    }
});
