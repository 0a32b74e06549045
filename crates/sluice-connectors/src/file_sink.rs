//! Files in a directory, exactly once.
//!
//! Batch N's rows go to one file, `part-<N>.<ext>`, by this protocol:
//!
//! 1. if `_sluice/manifest/<N>` exists, an earlier attempt of batch N got at
//!    least that far: remove the files it lists;
//! 2. write the new file under `_sluice/staging/` (synced);
//! 3. write `_sluice/manifest/<N>` listing it (atomic, checksummed);
//! 4. rename the file into the directory.
//!
//! The engine logs batch N's commit in the query's checkpoint after that. A batch
//! is only ever re-run with the same offsets, so it produces the same file
//! under the same name: a re-run replaces its own output instead of adding to
//! it. Readers that list the directory (DataFusion, Spark, `ls`) never see a
//! half-written file, and skip `_sluice/` as a metadata directory.

use std::fs;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use serde::{Deserialize, Serialize};
use sluice_common::durable::{self, Durability};
use sluice_common::{BatchId, Error, Options, OutputMode, Result};

use crate::decode::Format;
use sluice_common::connector::Sink;

/// `_sluice/manifest/<N>`: the files batch N wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The batch id.
    pub batch_id: BatchId,
    /// File names, relative to the sink's directory.
    pub files: Vec<String>,
}

/// Writes each batch as one file in a directory, exactly once.
#[derive(Debug, Clone)]
pub struct FileSink {
    name: String,
    path: PathBuf,
    format: Format,
    durability: Durability,
}

impl FileSink {
    fn new(path: impl Into<PathBuf>, format: Format) -> Self {
        let path = path.into();
        FileSink {
            name: path.display().to_string(),
            path,
            format,
            durability: Durability::Fsync,
        }
    }

    /// Parquet files under `path`.
    pub fn parquet(path: impl Into<PathBuf>) -> Self {
        Self::new(path, Format::Parquet)
    }

    /// Newline-delimited JSON files under `path`.
    pub fn json(path: impl Into<PathBuf>) -> Self {
        Self::new(path, Format::Json)
    }

    /// CSV files (with a header line) under `path`.
    pub fn csv(path: impl Into<PathBuf>) -> Self {
        Self::new(
            path,
            Format::Csv {
                header: true,
                delimiter: b',',
            },
        )
    }

    /// Whether files and manifests are fsynced (default: yes).
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// The sink's name.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Builds the sink from `CREATE SINK ... WITH (connector = 'file', ...)`.
    pub fn from_options(name: &str, options: &Options) -> Result<Self> {
        let path = options.require("path")?;
        let sink = match options
            .get_choice("format", &["json", "csv", "parquet"])?
            .as_deref()
        {
            Some("json") => Self::json(path),
            Some("csv") => Self::csv(path),
            Some(_) | None => Self::parquet(path),
        };
        let durability = match options.get_bool("sync")? {
            Some(false) => Durability::NoSync,
            _ => Durability::Fsync,
        };
        Ok(sink.named(name).with_durability(durability))
    }

    fn meta_dir(&self) -> PathBuf {
        self.path.join("_sluice")
    }

    fn manifest_path(&self, id: BatchId) -> PathBuf {
        self.meta_dir().join("manifest").join(id.to_string())
    }

    fn encode(&self, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        match &self.format {
            Format::Parquet => {
                let mut w = ArrowWriter::try_new(&mut buf, schema.clone(), None)
                    .map_err(|e| Error::internal(format!("parquet writer: {e}")))?;
                for b in batches {
                    w.write(b)
                        .map_err(|e| Error::internal(format!("parquet writer: {e}")))?;
                }
                w.close()
                    .map_err(|e| Error::internal(format!("parquet writer: {e}")))?;
            }
            Format::Csv { .. } => {
                let mut w = datafusion::arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut buf);
                for b in batches {
                    w.write(b)?;
                }
            }
            Format::Json => {
                let mut w = datafusion::arrow::json::LineDelimitedWriter::new(&mut buf);
                for b in batches {
                    w.write(b)?;
                }
                w.finish()?;
            }
        }
        Ok(buf)
    }
}

/// The files of every batch recorded in the sink directory's manifest, in
/// batch order.
pub fn committed_files(dir: &Path) -> Result<Vec<(BatchId, Vec<String>)>> {
    let mdir = dir.join("_sluice").join("manifest");
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(&mdir) else {
        return Ok(out);
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let m: Manifest = durable::read_json(&e.path())?;
        out.push((m.batch_id, m.files));
    }
    out.sort();
    Ok(out)
}

#[async_trait]
impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn open(&self, _schema: &SchemaRef, mode: OutputMode) -> Result<()> {
        if matches!(mode, OutputMode::Update | OutputMode::Complete) {
            return Err(Error::plan(format!(
                "file sink '{}' supports output_mode = 'append' or 'changelog' only (a file cannot be updated in place); use a memory, console or foreach_batch sink for {mode} mode",
                self.name
            )));
        }
        let staging = self.meta_dir().join("staging");
        fs::create_dir_all(&staging)
            .map_err(|e| Error::io(format!("creating {}", staging.display()), e))?;
        fs::create_dir_all(self.meta_dir().join("manifest"))
            .map_err(|e| Error::io(format!("creating {}", self.meta_dir().display()), e))?;
        // Temporary files of manifest writes a crash cut short.
        sluice_common::durable::remove_stale_temp_files(&self.meta_dir());
        // Left over by a run that died between staging and manifest.
        for e in fs::read_dir(&staging)
            .map_err(|e| Error::io(format!("listing {}", staging.display()), e))?
            .flatten()
        {
            let _ = fs::remove_file(e.path());
        }
        Ok(())
    }

    async fn write(
        &self,
        id: BatchId,
        schema: &SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> Result<()> {
        let manifest_path = self.manifest_path(id);
        if manifest_path.exists() {
            let old: Manifest = durable::read_json(&manifest_path)?;
            for f in old.files {
                match fs::remove_file(self.path.join(&f)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(Error::io(
                            format!("removing {f} of an earlier attempt of batch {id}"),
                            e,
                        ));
                    }
                }
            }
        }
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let mut files = Vec::new();
        let mut staged = Vec::new();
        if rows > 0 {
            let file = format!("part-{id:06}.{}", self.format.extension());
            let tmp = self.meta_dir().join("staging").join(&file);
            durable::write_atomic(&tmp, &self.encode(schema, &batches)?, self.durability)?;
            staged.push((tmp, self.path.join(&file)));
            files.push(file);
        }
        durable::write_json(
            &manifest_path,
            &Manifest {
                batch_id: id,
                files,
            },
            self.durability,
        )?;
        for (from, to) in staged {
            durable::io_step("moving a staged file into place:", &to)
                .and_then(|()| fs::rename(&from, &to))
                .map_err(|e| Error::io(format!("moving {} into place", to.display()), e))?;
        }
        if self.durability == Durability::Fsync {
            durable::sync_dir(&self.path)
                .map_err(|e| Error::io(format!("syncing {}", self.path.display()), e))?;
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    /// Each query writes a subdirectory named after it, with its own
    /// manifest, so readers of the whole directory see every query's files.
    fn for_query(&self, query: &str) -> Option<std::sync::Arc<dyn Sink>> {
        Some(std::sync::Arc::new(FileSink {
            path: self.path.join(query),
            ..self.clone()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_rerun_batch_replaces_its_file_and_leaves_no_staging() {
        let dir = tempfile::tempdir().unwrap();
        let schema: SchemaRef = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, true)]));
        let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![1, 2]))])
            .unwrap();
        let sink = FileSink::json(dir.path()).with_durability(Durability::NoSync);
        sink.open(&schema, OutputMode::Append).await.unwrap();
        sink.write(0, &schema, vec![b.clone()]).await.unwrap();
        sink.write(1, &schema, vec![]).await.unwrap();
        sink.write(0, &schema, vec![b]).await.unwrap();
        let visible: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('_'))
            .collect();
        assert_eq!(visible, vec!["part-000000.json"]);
        assert_eq!(
            fs::read_to_string(dir.path().join("part-000000.json")).unwrap(),
            "{\"x\":1}\n{\"x\":2}\n"
        );
        assert_eq!(
            committed_files(dir.path()).unwrap(),
            vec![(0, vec!["part-000000.json".to_string()]), (1, vec![])]
        );
        assert_eq!(
            fs::read_dir(dir.path().join("_sluice/staging"))
                .unwrap()
                .count(),
            0
        );
    }
}
