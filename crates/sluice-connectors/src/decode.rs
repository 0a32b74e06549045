//! Decoding file contents into rows of a declared schema, record by record
//! when needed, so that a bad record is named by its line and can be failed
//! on, dropped or dead-lettered without losing its neighbours.

use std::sync::Arc;

use bytes::Bytes;
use datafusion::arrow::array::{ArrayRef, new_null_array};
use datafusion::arrow::compute::{CastOptions, cast_with_options};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// A file format a source can read.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    /// Newline-delimited JSON objects.
    Json,
    /// CSV with an optional header line.
    Csv {
        /// Whether the first line names the columns.
        header: bool,
        /// The field separator.
        delimiter: u8,
    },
    /// Apache Parquet.
    Parquet,
}

impl Format {
    /// The usual file name extension.
    pub fn extension(&self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Csv { .. } => "csv",
            Format::Parquet => "parquet",
        }
    }
}

/// The CSV field separator of `options` (`delimiter`, one character; default `,`).
pub fn delimiter_option(options: &sluice_common::Options) -> sluice_common::Result<u8> {
    match options.get("delimiter") {
        None => Ok(b','),
        Some(d) if d.len() == 1 => Ok(d.as_bytes()[0]),
        Some(d) => Err(sluice_common::Error::plan(format!(
            "{}: delimiter must be one character, got '{d}'",
            options.owner()
        ))),
    }
}

/// A record that did not decode.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRecord {
    /// 1-based line number (None: the whole file is unreadable).
    pub line: Option<usize>,
    /// Why it did not decode.
    pub error: String,
    /// The record as it was in the file.
    pub raw: String,
}

/// The rows of a file and its bad records.
#[derive(Debug, Default)]
pub struct Decoded {
    /// The rows that decoded, in the declared schema.
    pub batches: Vec<RecordBatch>,
    /// The records that did not.
    pub bad: Vec<BadRecord>,
}

const BATCH_SIZE: usize = 8192;

/// Decodes a whole file's `bytes` into rows of `schema`; records that do not
/// decode are returned beside them, named by line. Never panics, whatever
/// the bytes (a fuzz target checks it).
pub fn decode(format: &Format, schema: &SchemaRef, bytes: Bytes) -> Decoded {
    match format {
        Format::Json | Format::Csv { .. } => decode_text(format, schema, &bytes),
        Format::Parquet => match decode_parquet(schema, bytes) {
            Ok(batches) => Decoded {
                batches,
                bad: vec![],
            },
            Err(e) => Decoded {
                batches: vec![],
                bad: vec![BadRecord {
                    line: None,
                    error: e,
                    raw: String::new(),
                }],
            },
        },
    }
}

/// Rows decoded from a list of records (e.g. Kafka message values), each
/// record one row.
#[derive(Debug, Default)]
pub struct DecodedRecords {
    /// The rows, in record order, one per record in `kept`.
    pub batches: Vec<RecordBatch>,
    /// The indices of the records the rows came from, ascending.
    pub kept: Vec<usize>,
    /// Records that did not decode to exactly one row: index and why.
    pub bad: Vec<(usize, String)>,
}

/// Decodes each of `records` (JSON objects, or CSV lines without a header)
/// as one row of `schema`. A record that is blank, holds more than one row,
/// or does not decode is bad, named by its index; its neighbours are kept.
/// Never panics, whatever the bytes.
pub fn decode_records(format: &Format, schema: &SchemaRef, records: &[&[u8]]) -> DecodedRecords {
    let format = match format {
        Format::Csv { delimiter, .. } => Format::Csv {
            header: false,
            delimiter: *delimiter,
        },
        // Parquet is not a per-record format: every record is bad.
        Format::Parquet => {
            return DecodedRecords {
                bad: (0..records.len())
                    .map(|i| (i, "a record cannot be a Parquet file".to_string()))
                    .collect(),
                ..Default::default()
            };
        }
        other => other.clone(),
    };
    let mut bad = Vec::new();
    let mut lines: Vec<(usize, std::borrow::Cow<'_, [u8]>)> = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        let r = r.strip_suffix(b"\n").unwrap_or(r);
        let r = r.strip_suffix(b"\r").unwrap_or(r);
        if r.iter().all(u8::is_ascii_whitespace) {
            bad.push((i, "empty record".to_string()));
        } else if !r.contains(&b'\n') && !r.contains(&b'\r') {
            lines.push((i, std::borrow::Cow::Borrowed(r)));
        } else if format == Format::Json {
            // Outside strings a line break is whitespace, and inside them
            // JSON forbids it: as a space, the record means the same.
            let flat = r
                .iter()
                .map(|b| if matches!(b, b'\n' | b'\r') { b' ' } else { *b })
                .collect::<Vec<u8>>();
            lines.push((i, std::borrow::Cow::Owned(flat)));
        } else {
            bad.push((i, "a CSV record must be one line".to_string()));
        }
    }
    let joined = |lines: &[(usize, std::borrow::Cow<'_, [u8]>)]| {
        let mut buf = Vec::with_capacity(lines.iter().map(|(_, l)| l.len() + 1).sum());
        for (_, l) in lines {
            buf.extend_from_slice(l);
            buf.push(b'\n');
        }
        buf
    };
    let rows = |batches: &[RecordBatch]| batches.iter().map(RecordBatch::num_rows).sum::<usize>();
    // Fast path: all records at once, when each record is one whole JSON
    // object or a CSV line with its quotes closed (so no record can run
    // into the next), accepted when it gives one row each.
    let whole = |l: &[u8]| match &format {
        Format::Json => one_json_object(l),
        _ => l.iter().filter(|b| **b == b'"').count() % 2 == 0,
    };
    if lines.iter().all(|(_, l)| whole(l))
        && let Ok(batches) = decode_chunk(&format, schema, &joined(&lines), false, BATCH_SIZE)
        && rows(&batches) == lines.len()
    {
        bad.sort_by_key(|(i, _)| *i);
        return DecodedRecords {
            batches,
            kept: lines.into_iter().map(|(i, _)| i).collect(),
            bad,
        };
    }
    // Record by record: each good record's own row is kept, so no record
    // can take its neighbours' rows.
    let mut kept = Vec::new();
    let mut batches = Vec::new();
    for (i, line) in lines {
        if !whole(&line) {
            let why = match &format {
                Format::Json => "the record is not one whole JSON object",
                _ => "the record has a quote that is not closed",
            };
            bad.push((i, why.to_string()));
            continue;
        }
        match decode_chunk(&format, schema, &line, false, 1) {
            Ok(b) if rows(&b) == 1 => {
                kept.push(i);
                batches.extend(b);
            }
            Ok(b) => bad.push((i, format!("the record holds {} rows, not one", rows(&b)))),
            Err(e) => bad.push((i, clean_arrow_error(&e))),
        }
    }
    let batches = match datafusion::arrow::compute::concat_batches(schema, &batches) {
        Ok(b) if b.num_rows() > 0 => vec![b],
        _ => batches,
    };
    bad.sort_by_key(|(i, _)| *i);
    DecodedRecords { batches, kept, bad }
}

/// Whether `r` is exactly one JSON object (surrounding whitespace allowed):
/// it opens with `{` and the brace that closes it is its last character.
/// A structural check only; the decoder checks the rest.
fn one_json_object(r: &[u8]) -> bool {
    let r = r.trim_ascii();
    if r.first() != Some(&b'{') || r.last() != Some(&b'}') {
        return false;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, b) in r.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = match depth.checked_sub(1) {
                    Some(d) => d,
                    None => return false,
                };
                if depth == 0 && i + 1 != r.len() {
                    return false;
                }
            }
            _ => {}
        }
    }
    depth == 0 && !in_string
}

fn decode_text(format: &Format, schema: &SchemaRef, bytes: &[u8]) -> Decoded {
    // Fast path: the whole file at once. Only when it fails do we go record
    // by record to find (and keep the neighbours of) the bad ones.
    if let Ok(batches) = decode_chunk(format, schema, bytes, true, BATCH_SIZE) {
        return Decoded {
            batches,
            bad: vec![],
        };
    }
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let skip = matches!(format, Format::Csv { header: true, .. }) as usize;
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate().skip(skip) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match decode_chunk(format, schema, line, false, 1) {
            Ok(batches) => {
                good.extend_from_slice(line);
                good.push(b'\n');
                drop(batches);
            }
            Err(e) => bad.push(BadRecord {
                line: Some(i + 1),
                error: clean_arrow_error(&e),
                raw: String::from_utf8_lossy(line).into_owned(),
            }),
        }
    }
    match decode_chunk(format, schema, &good, false, BATCH_SIZE) {
        Ok(batches) => Decoded { batches, bad },
        // Each line decoded alone but not together: keep nothing of the file
        // rather than a guess, and say so.
        Err(e) => {
            bad.push(BadRecord {
                line: None,
                error: format!(
                    "the file's good lines do not decode together: {}",
                    clean_arrow_error(&e)
                ),
                raw: String::new(),
            });
            Decoded {
                batches: vec![],
                bad,
            }
        }
    }
}

/// Decodes `buf` (`with_header`: it starts with the file's header line) in
/// batches of `batch_size` rows: one record alone needs no big buffers.
fn decode_chunk(
    format: &Format,
    schema: &SchemaRef,
    mut buf: &[u8],
    with_header: bool,
    batch_size: usize,
) -> Result<Vec<RecordBatch>, ArrowError> {
    let mut out = Vec::new();
    match format {
        Format::Json => {
            let mut dec = datafusion::arrow::json::ReaderBuilder::new(Arc::clone(schema))
                .with_batch_size(batch_size)
                .build_decoder()?;
            while !buf.is_empty() {
                let n = dec.decode(buf)?;
                buf = &buf[n..];
                if let Some(b) = dec.flush()? {
                    out.push(b);
                }
                if n == 0 {
                    break;
                }
            }
            if let Some(b) = dec.flush()? {
                out.push(b);
            }
        }
        Format::Csv { header, delimiter } => {
            let mut dec = datafusion::arrow::csv::ReaderBuilder::new(Arc::clone(schema))
                .with_header(*header && with_header)
                .with_delimiter(*delimiter)
                .with_batch_size(batch_size)
                .build_decoder();
            loop {
                let n = dec.decode(buf)?;
                buf = &buf[n..];
                if let Some(b) = dec.flush()? {
                    out.push(b);
                }
                if n == 0 && buf.is_empty() {
                    break;
                }
                if n == 0 {
                    return Err(ArrowError::CsvError("decoder made no progress".into()));
                }
            }
        }
        Format::Parquet => unreachable!("parquet is not line-oriented"),
    }
    Ok(out)
}

fn decode_parquet(schema: &SchemaRef, bytes: Bytes) -> Result<Vec<RecordBatch>, String> {
    // The Parquet and Arrow IPC crates can panic on some corrupt files
    // rather than return an error: the fuzz target found one in the level
    // decoder (while reading pages) and one in the Arrow schema embedded in
    // the footer's metadata (while opening). Either is bad input like any
    // other, so the whole read, opening included, runs under the guard.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .map_err(|e| format!("not a readable Parquet file: {e}"))?
            .with_batch_size(BATCH_SIZE)
            .build()
            .map_err(|e| format!("not a readable Parquet file: {e}"))?;
        let mut out = Vec::new();
        for b in reader {
            let b = b.map_err(|e| format!("corrupt or truncated Parquet data: {e}"))?;
            out.push(conform_by_name(schema, &b)?);
        }
        Ok(out)
    }))
    .unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(format!(
            "corrupt Parquet data: the Parquet reader failed on it ({why})"
        ))
    })
}

/// Selects and casts the columns of `batch` to `schema` by name.
fn conform_by_name(schema: &SchemaRef, batch: &RecordBatch) -> Result<RecordBatch, String> {
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        let col = match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Arc::clone(c),
            Some(c) => cast_with_options(
                c,
                f.data_type(),
                &CastOptions {
                    safe: false,
                    ..Default::default()
                },
            )
            .map_err(|e| {
                format!(
                    "column '{}' ({}) cannot be read as {}: {e}",
                    f.name(),
                    c.data_type(),
                    f.data_type()
                )
            })?,
            None if f.is_nullable() => new_null_array(f.data_type(), batch.num_rows()),
            None => {
                return Err(format!(
                    "the file has no column '{}', which is NOT NULL",
                    f.name()
                ));
            }
        };
        cols.push(col);
    }
    RecordBatch::try_new(Arc::clone(schema), cols).map_err(|e| e.to_string())
}

fn clean_arrow_error(e: &ArrowError) -> String {
    let s = e.to_string();
    for prefix in [
        "Json error: ",
        "Csv error: ",
        "Parser error: ",
        "Cast error: ",
    ] {
        if let Some(rest) = s.strip_prefix(prefix) {
            return rest.to_string();
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("name", DataType::Utf8, true),
        ]))
    }

    fn rows(d: &Decoded) -> usize {
        rows_of(&d.batches)
    }

    fn rows_of(batches: &[RecordBatch]) -> usize {
        batches.iter().map(RecordBatch::num_rows).sum()
    }

    #[test]
    fn a_parquet_file_that_makes_the_reader_panic_is_a_bad_record() {
        // Found by the `decoders` fuzz target (kept in its corpus): the
        // Parquet crate's level decoder panics on this file.
        let bytes = include_bytes!("../../../fuzz/corpus/decoders/parquet-level-decoder-panic");
        let d = decode(&Format::Parquet, &schema(), Bytes::from_static(bytes));
        assert_eq!(rows(&d), 0);
        assert_eq!(d.bad.len(), 1);
        assert!(
            d.bad[0].error.contains("corrupt Parquet data"),
            "{}",
            d.bad[0].error
        );
    }

    #[test]
    fn a_parquet_file_whose_embedded_arrow_schema_panics_is_a_bad_record() {
        // Found by the `decoders` fuzz target in CI (kept in its corpus): the
        // footer's ARROW:schema names a 201326656-bit integer, and the Arrow
        // IPC crate panics while the reader is being opened.
        let bytes = include_bytes!("../../../fuzz/corpus/decoders/parquet-arrow-schema-panic");
        let d = decode(&Format::Parquet, &schema(), Bytes::from_static(bytes));
        assert_eq!(rows(&d), 0);
        assert_eq!(d.bad.len(), 1);
        assert!(
            d.bad[0].error.contains("corrupt Parquet data") && d.bad[0].error.contains("bit width"),
            "{}",
            d.bad[0].error
        );
    }

    #[test]
    fn records_decode_one_row_each_and_bad_ones_are_named_by_index() {
        let recs: Vec<&[u8]> = vec![
            b"{\"id\":1,\"name\":\"a\"}",
            b"",
            b"{\"id\":2,\n \"name\":\"b\"}",
            b"{\"id\": oops}",
            b"{\"id\":3} {\"id\":4}",
            b"{\"id\":5}\n",
        ];
        let d = decode_records(&Format::Json, &schema(), &recs);
        assert_eq!(d.kept, vec![0, 2, 5]);
        assert_eq!(rows_of(&d.batches), 3);
        let bad: Vec<usize> = d.bad.iter().map(|(i, _)| *i).collect();
        assert_eq!(bad, vec![1, 3, 4]);
        assert!(
            d.bad[2].1.contains("not one whole JSON object"),
            "{}",
            d.bad[2].1
        );

        let csv = Format::Csv {
            header: true,
            delimiter: b',',
        };
        let recs: Vec<&[u8]> = vec![b"1,a", b"x,b", b"3,c\r\n", b"4,\"d\ne\""];
        let d = decode_records(&csv, &schema(), &recs);
        assert_eq!(d.kept, vec![0, 2]);
        assert_eq!(
            d.bad.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![1, 3]
        );

        // Records that would pair up wrongly if read together: two objects
        // in one record, and one object cut over two records. Each is named;
        // the good neighbour keeps its own row.
        let recs: Vec<&[u8]> = vec![
            b"{\"id\":1}{\"id\":2}",
            b"{\"id\":",
            b"3}",
            b"{\"id\":4, \"name\": \"}{\"}",
        ];
        let d = decode_records(&Format::Json, &schema(), &recs);
        assert_eq!(d.kept, vec![3]);
        assert_eq!(rows_of(&d.batches), 1);
        assert_eq!(
            d.bad.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );

        // A CSV record with an open quote cannot swallow the next ones.
        let recs: Vec<&[u8]> = vec![b"1,a", b"42,\"hello", b"3,c"];
        let d = decode_records(&csv, &schema(), &recs);
        assert_eq!(d.kept, vec![0, 2]);
        assert_eq!(rows_of(&d.batches), 2);
        assert!(d.bad[0].1.contains("quote"), "{:?}", d.bad);
    }

    #[test]
    fn json_bad_lines_are_named_and_neighbours_kept() {
        let text = "{\"id\":1,\"name\":\"a\"}\n{\"id\":2,\"name\":\"b\"}\n{\"id\": oops}\n\n{\"id\":\"x\"}\n{\"id\":5}";
        let d = decode_text(&Format::Json, &schema(), text.as_bytes());
        assert_eq!(rows(&d), 3);
        assert_eq!(
            d.bad.iter().map(|b| b.line).collect::<Vec<_>>(),
            vec![Some(3), Some(5)]
        );
        assert_eq!(d.bad[0].raw, "{\"id\": oops}");
    }

    #[test]
    fn csv_bad_lines_are_named_after_the_header() {
        let text = "id,name\n1,a\nzz,b\n3,c\n";
        let f = Format::Csv {
            header: true,
            delimiter: b',',
        };
        let d = decode_text(&f, &schema(), text.as_bytes());
        assert_eq!(rows(&d), 2);
        assert_eq!(d.bad.len(), 1);
        assert_eq!(d.bad[0].line, Some(3));
        let clean = decode_text(&f, &schema(), b"id,name\n1,a\n2,b");
        assert_eq!((rows(&clean), clean.bad.len()), (2, 0));
    }

    #[test]
    fn decoders_never_panic_on_garbage() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for n in 0..300usize {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let alphabet = b"{}[]\",:\n0123abc -.eE\\tnul";
            let bytes: Vec<u8> = (0..n % 97)
                .map(|i| alphabet[((seed >> (i % 60)) as usize) % alphabet.len()])
                .collect();
            for f in [
                Format::Json,
                Format::Csv {
                    header: n % 2 == 0,
                    delimiter: b',',
                },
            ] {
                let _ = decode_text(&f, &schema(), &bytes);
            }
        }
    }
}
