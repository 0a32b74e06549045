//! A memory sink's rows as a DataFusion table.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use sluice_connectors::MemoryTable;

/// Reads the rows a memory sink holds at scan time.
#[derive(Debug)]
pub struct MemorySinkTable {
    table: Arc<MemoryTable>,
}

impl MemorySinkTable {
    /// A table over `table`.
    pub fn new(table: Arc<MemoryTable>) -> Self {
        MemorySinkTable { table }
    }
}

#[async_trait]
impl TableProvider for MemorySinkTable {
    fn schema(&self) -> SchemaRef {
        self.table
            .schema()
            .unwrap_or_else(|| Arc::new(Schema::empty()))
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        let rows = self.table.rows();
        Ok(MemorySourceConfig::try_new_exec(
            &[rows],
            self.schema(),
            projection.cloned(),
        )?)
    }
}
