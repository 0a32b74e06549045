//! Files in a directory, exactly once.
//!
//! Batch N's rows go to one file, `part-<N>.<ext>`, a name that depends on
//! N alone, by this protocol:
//!
//! 1. write the file under `_sluice/staging/` (its data synced);
//! 2. rename it into the directory, over a file of that name an earlier
//!    attempt of batch N left, and sync the directory. A batch with no rows
//!    instead removes such a file, if there is one.
//!
//! The engine logs batch N's commit in the query's checkpoint after that. A batch
//! is only ever re-run with the same offsets, so it produces the same file
//! under the same name: a re-run replaces its own output instead of adding to
//! it. Readers that list the directory (DataFusion, Spark, `ls`) never see a
//! half-written file, and skip `_sluice/` as a metadata directory.
//!
//! Sinks written before 2026-12-04 also wrote `_sluice/manifest/<N>`, a
//! list of batch N's files; a re-run still removes the files an existing
//! manifest lists, and no new manifest is written (the name says it all).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use sluice_common::durable::{self, Durability};
use sluice_common::remote::Location;
use sluice_common::{BatchId, Error, Options, OutputMode, Result};

use crate::decode::Format;
use sluice_common::connector::Sink;

/// `_sluice/manifest/<N>`: the files batch N wrote, in sinks written before
/// 2026-12-04 (read, never written).
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

    /// Whether files, and the directory they are renamed into, are fsynced
    /// (default: yes).
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
        if path.contains("://") && !sluice_common::remote::is_url(Path::new(&path)) {
            return Err(Error::not_supported(format!(
                "{}: the URL '{path}' (local paths, file:// and s3:// URLs are written)",
                options.owner()
            )));
        }
        let path = path.trim_start_matches("file://").to_string();
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

    /// [`Sink::write`] into a bucket: batch N's object is put in one
    /// request, which S3 makes visible whole or not at all, over the
    /// object an earlier attempt of N put; a batch with no rows deletes
    /// such an object. Objects of N in another format go first.
    async fn write_object(
        &self,
        id: BatchId,
        file: &str,
        (url, store, prefix): (&str, Arc<dyn ObjectStore>, &ObjectPath),
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()> {
        let at = |name: &str| ObjectPath::from_iter(prefix.parts().chain([name.into()]));
        let failed = |what: String, e: object_store::Error| {
            Error::io(format!("{what} {url}/{file}"), std::io::Error::other(e))
        };
        let delete = |name: String| {
            let store = Arc::clone(&store);
            let location = at(&name);
            async move {
                match store.delete(&location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(failed(
                        format!("removing {name} of an earlier attempt of"),
                        e,
                    )),
                }
            }
        };
        for other in ["json", "csv", "parquet"] {
            if other != self.format.extension() {
                delete(format!("part-{id:06}.{other}")).await?;
            }
        }
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        if rows == 0 {
            return delete(file.to_string()).await;
        }
        let bytes = self.encode(schema, batches)?;
        let shown = PathBuf::from(format!("{url}/{file}"));
        durable::io_step("putting to the object store", &shown)
            .map_err(|e| Error::io(format!("writing {}", shown.display()), e))?;
        store
            .put(&at(file), PutPayload::from(bytes))
            .await
            .map_err(|e| failed("writing".into(), e))?;
        Ok(())
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

/// The batch files of a sink directory (`part-<N>.<ext>`), by batch, in
/// batch order: what readers of the directory see. Files of a batch whose
/// commit the query has not logged yet are among them (a crash between
/// the rename and the commit record leaves one until the batch re-runs).
pub fn batch_files(dir: &Path) -> Result<Vec<(BatchId, Vec<String>)>> {
    let mut out: Vec<(BatchId, Vec<String>)> = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let id = name
            .strip_prefix("part-")
            .and_then(|r| r.split_once('.'))
            .and_then(|(n, _)| n.parse::<BatchId>().ok());
        if let Some(id) = id {
            out.push((id, vec![name]));
        }
    }
    out.sort();
    Ok(out)
}

/// Removes `path`, a file an earlier attempt of batch `id` made visible;
/// whether it was there.
fn remove_if_there(path: &Path, id: BatchId) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(
            format!(
                "removing {} of an earlier attempt of batch {id}",
                path.display()
            ),
            e,
        )),
    }
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
        if sluice_common::remote::is_url(&self.path) {
            // A bucket: one put per batch file, nothing staged.
            Location::parse(&self.path)?;
            return Ok(());
        }
        let staging = self.meta_dir().join("staging");
        fs::create_dir_all(&staging)
            .map_err(|e| Error::io(format!("creating {}", staging.display()), e))?;
        // Temporary files of manifest writes a crash cut short (manifests
        // were written before 2026-12-04).
        sluice_common::durable::remove_stale_temp_files(&self.meta_dir());
        // Left over by a run that died between staging and the rename.
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
        let file = format!("part-{id:06}.{}", self.format.extension());
        if let Location::Store { url, store, prefix } = Location::parse(&self.path)? {
            return self
                .write_object(id, &file, (&url, store, &prefix), schema, &batches)
                .await;
        }
        let target = self.path.join(&file);
        let mut removed = false;
        // An earlier attempt of batch N by a Sluice that wrote manifests.
        let manifest_path = self.manifest_path(id);
        if manifest_path.exists() {
            let old: Manifest = durable::read_json(&manifest_path)?;
            for f in old.files.iter().filter(|f| **f != file) {
                removed |= remove_if_there(&self.path.join(f), id)?;
            }
        }
        // A batch's file in another format: an earlier attempt before the
        // sink's format changed (the manifest used to catch this).
        for other in ["json", "csv", "parquet"] {
            if other != self.format.extension() {
                let name = format!("part-{id:06}.{other}");
                removed |= remove_if_there(&self.path.join(name), id)?;
            }
        }
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        if rows > 0 {
            let staged = self.meta_dir().join("staging").join(&file);
            durable::write_unlinked(&staged, &self.encode(schema, &batches)?, self.durability)?;
            durable::io_step("moving a staged file into place:", &target)
                .and_then(|()| fs::rename(&staged, &target))
                .map_err(|e| Error::io(format!("moving {} into place", target.display()), e))?;
        } else {
            // An earlier attempt that had rows made them visible: they go.
            removed |= remove_if_there(&target, id)?;
        }
        if self.durability == Durability::Fsync && (rows > 0 || removed) {
            durable::sync_dir(&self.path)
                .map_err(|e| Error::io(format!("syncing {}", self.path.display()), e))?;
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    /// Each query writes a subdirectory named after it, with its own
    /// `_sluice/`, so readers of the whole directory see every query's files.
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
            batch_files(dir.path()).unwrap(),
            vec![(0, vec!["part-000000.json".to_string()])]
        );
        assert_eq!(
            fs::read_dir(dir.path().join("_sluice/staging"))
                .unwrap()
                .count(),
            0
        );
        // No manifest is written: the name is the batch's.
        assert!(!dir.path().join("_sluice/manifest").exists());
        // A re-run that finds no rows removes what an earlier attempt made
        // visible.
        sink.write(0, &schema, vec![]).await.unwrap();
        assert!(!dir.path().join("part-000000.json").exists());
        assert_eq!(batch_files(dir.path()).unwrap(), vec![]);
    }

    #[tokio::test]
    async fn a_rerun_removes_the_files_an_older_sinks_manifest_lists() {
        let dir = tempfile::tempdir().unwrap();
        let schema: SchemaRef = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, true)]));
        let sink = FileSink::json(dir.path()).with_durability(Durability::NoSync);
        sink.open(&schema, OutputMode::Append).await.unwrap();
        // Left by a Sluice that wrote manifests, crashed after its rename.
        fs::write(dir.path().join("old-3.json"), "{\"x\":9}\n").unwrap();
        durable::write_json(
            &dir.path().join("_sluice/manifest/3"),
            &Manifest {
                batch_id: 3,
                files: vec!["old-3.json".into()],
            },
            Durability::NoSync,
        )
        .unwrap();
        sink.write(3, &schema, vec![]).await.unwrap();
        assert!(!dir.path().join("old-3.json").exists());
        // The same batch's file in another format, left before the sink's
        // format changed, goes too.
        fs::write(dir.path().join("part-000004.csv"), "x\n9\n").unwrap();
        let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![1]))])
            .unwrap();
        sink.write(4, &schema, vec![b]).await.unwrap();
        assert!(!dir.path().join("part-000004.csv").exists());
        assert!(dir.path().join("part-000004.json").exists());
    }
}
