//! Any bytes as a JSON, CSV (with and without header, two delimiters) or
//! Parquet file of a fixed schema: rows and named bad records, never a panic.
//! The same bytes cut at NUL bytes are a list of records (as a Kafka source
//! decodes message values): every record is kept with exactly one row, or
//! named bad, never both.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use sluice_connectors::datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use sluice_connectors::decode::{Format, decode, decode_records};

fuzz_target!(|data: &[u8]| {
    // libfuzzer-sys's panic hook aborts on every panic, even one `decode`
    // catches (it turns a panic of the Parquet reader into a bad record).
    // With the default hook back, a caught panic is only printed, and one
    // that escapes `decode` still aborts the run (the harness's own
    // catch_unwind does that).
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| drop(std::panic::take_hook()));
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
    let records: Vec<&[u8]> = data.split(|b| *b == 0).collect();
    for format in [
        Format::Json,
        Format::Csv {
            header: false,
            delimiter: b',',
        },
    ] {
        let d = decode_records(&format, &schema, &records);
        let rows: usize = d.batches.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, d.kept.len(), "one row per kept record");
        let mut all: Vec<usize> = d.kept.iter().copied().collect();
        all.extend(d.bad.iter().map(|(i, _)| *i));
        all.sort_unstable();
        assert_eq!(
            all,
            (0..records.len()).collect::<Vec<_>>(),
            "each record kept or bad, once"
        );
        for b in &d.batches {
            assert_eq!(b.schema(), schema, "rows come out in the declared schema");
        }
    }
});
