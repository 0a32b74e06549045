//! Which partition a key's state is in, checked against the build that
//! wrote the checkpoint.
//!
//! A row reaches state partition `k` of `P` by the hash repartitioning the
//! shuffle does (DataFusion's `BatchPartitioner`: its seeded hash of the key
//! columns, reduced mod P; Ballista's shuffle writers hash alike). The
//! checkpoint keeps P, but the hash is DataFusion's, not Sluice's: a
//! DataFusion upgrade that changed it would send known keys to other
//! partitions without an error, and an aggregate would then hold a group
//! twice, a join miss its matches, a deduplication emit a row again.
//!
//! So `state/<op>/partitions` also records where a fixed set of probe keys
//! of the operator's key types go ([`probe`]), and each batch on a cluster
//! computes it again and refuses to run when it differs.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray, UInt32Array, new_null_array,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, UInt32Type};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_plan::metrics::Time;
use datafusion::physical_plan::repartition::BatchPartitioner;
use sluice_common::{Error, Result};

/// How many probe keys are placed.
pub const PROBES: usize = 32;

/// The probe values of key column `c`: spread out, negative and positive,
/// different per column.
fn probe_values(c: usize) -> Vec<i64> {
    (0..PROBES as i64)
        .map(|i| i * 7919 - 100_003 + c as i64 * 31)
        .collect()
}

/// `PROBES` keys of type `t` for key column `c`: the probe integers cast
/// to `t`, or as text (`k<n>`) cast to it, or nulls for a type neither
/// casts to.
fn probe_column(t: &DataType, c: usize) -> ArrayRef {
    let ints: ArrayRef = Arc::new(Int64Array::from(probe_values(c)));
    if let Ok(a) = cast(&ints, t)
        && a.null_count() == 0
    {
        return a;
    }
    let text: ArrayRef = Arc::new(StringArray::from_iter_values(
        probe_values(c).iter().map(|v| format!("k{v}")),
    ));
    if let Ok(a) = cast(&text, t) {
        return a;
    }
    new_null_array(t, PROBES)
}

/// The partition, of `n`, that each of [`PROBES`] probe keys of the key
/// types `types` goes to, as the shuffle would send them.
pub fn probe(types: &[DataType], n: usize) -> Result<Vec<u32>> {
    let mut fields: Vec<Field> = Vec::with_capacity(types.len() + 1);
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(types.len() + 1);
    let mut exprs: Vec<Arc<dyn PhysicalExpr>> = Vec::with_capacity(types.len());
    for (c, t) in types.iter().enumerate() {
        let name = format!("key{c}");
        fields.push(Field::new(&name, t.clone(), true));
        columns.push(probe_column(t, c));
        exprs.push(Arc::new(Column::new(&name, c)));
    }
    fields.push(Field::new("row", DataType::UInt32, false));
    columns.push(Arc::new(UInt32Array::from_iter_values(0..PROBES as u32)));
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
    let row = types.len();
    let mut out = vec![u32::MAX; PROBES];
    let mut partitioner = BatchPartitioner::new_hash_partitioner(exprs, n, Time::default())?;
    for part in partitioner.partition_iter(batch)? {
        let (p, rows) = part?;
        for i in rows.column(row).as_primitive::<UInt32Type>().values() {
            out[*i as usize] = p as u32;
        }
    }
    if out.contains(&u32::MAX) {
        return Err(Error::internal(
            "a probe key went to no partition in the hash check",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::{DataType, TimeUnit};

    use super::{PROBES, probe};

    #[test]
    fn probes_spread_over_the_partitions_and_place_alike_each_time() {
        for types in [
            vec![DataType::Int64],
            vec![DataType::Utf8],
            vec![DataType::Int32, DataType::Utf8View],
            vec![
                DataType::Timestamp(TimeUnit::Millisecond, None),
                DataType::Float64,
            ],
            vec![DataType::Date32, DataType::Boolean],
        ] {
            let a = probe(&types, 8).unwrap();
            assert_eq!(a.len(), PROBES);
            assert_eq!(a, probe(&types, 8).unwrap(), "{types:?}");
            let used = (0..8).filter(|p| a.contains(p)).count();
            assert!(used >= 4, "{types:?}: {a:?}");
            assert!(a.iter().all(|p| *p < 8));
        }
        // Other key types place the probes elsewhere: the check sees the
        // types' hashing, not only the partition count.
        assert_ne!(
            probe(&[DataType::Int64], 8).unwrap(),
            probe(&[DataType::Utf8], 8).unwrap()
        );
        assert!(
            probe(&[DataType::Int64], 1)
                .unwrap()
                .iter()
                .all(|p| *p == 0)
        );
    }
}
