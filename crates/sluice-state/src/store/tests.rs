use std::collections::BTreeMap;

use sluice_common::datafusion::arrow::array::{Array, AsArray, Int64Array, StringArray};
use sluice_common::datafusion::arrow::datatypes::Int64Type;

use super::*;

fn key_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("k", DataType::Utf8, false),
        Field::new("window_start", DataType::Int64, false),
    ]))
}

fn value_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new(
        "count",
        DataType::Int64,
        true,
    )]))
}

fn store(dir: Option<&Path>, snapshot_interval: u64, retain: u64) -> StateStore {
    let opts = StateStoreOptions {
        partitions: 3,
        snapshot_interval,
        retain_versions: retain,
        durability: Durability::NoSync,
        snapshot_fallback: false,
        prepare_next: true,
    };
    StateStore::new(
        dir.map(Path::to_path_buf),
        key_schema(),
        value_schema(),
        opts,
    )
    .unwrap()
}

fn rows(data: &[(&str, i64, i64)]) -> RecordBatch {
    let k: Vec<&str> = data.iter().map(|r| r.0).collect();
    let w: Vec<i64> = data.iter().map(|r| r.1).collect();
    let c: Vec<i64> = data.iter().map(|r| r.2).collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Utf8, false),
        Field::new("window_start", DataType::Int64, false),
        Field::new("count", DataType::Int64, false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(k)),
            Arc::new(Int64Array::from(w)),
            Arc::new(Int64Array::from(c)),
        ],
    )
    .unwrap()
}

type Model = BTreeMap<(String, i64), i64>;

fn contents(s: &StateStore) -> Model {
    // Every shard's bookkeeping (slots, index, live flags) agrees with its
    // chunks.
    for shard in &s.shards {
        shard.check();
    }
    s.removed.check();
    assert_eq!(s.shards.iter().map(|p| p.len()).sum::<usize>(), s.len());
    as_model(&s.scan().unwrap())
}

/// Rows (keys, then the count) as a map.
fn as_model(b: &RecordBatch) -> Model {
    let k = b.column(0).as_string::<i32>();
    let w = b.column(1).as_primitive::<Int64Type>();
    let c = b.column(2).as_primitive::<Int64Type>();
    (0..b.num_rows())
        .map(|i| ((k.value(i).to_string(), w.value(i)), c.value(i)))
        .collect()
}

#[test]
fn put_get_and_evict_in_memory() {
    let mut s = store(None, 10, 5);
    s.put(&rows(&[("a", 0, 1), ("b", 0, 2), ("a", 10, 3)]))
        .unwrap();
    s.put(&rows(&[("a", 0, 5)])).unwrap();
    assert_eq!(s.len(), 3);
    let probe = rows(&[("a", 0, 0), ("zz", 0, 0), ("a", 0, 0)]);
    let got = s.get(&probe.columns()[..2]).unwrap();
    assert_eq!(got.num_rows(), 1);
    assert_eq!(got.column(2).as_primitive::<Int64Type>().value(0), 5);
    // Evict windows starting before 10, as a watermark would.
    let gone = s
        .remove_where(|keys| {
            let w = keys.column(1).as_primitive::<Int64Type>();
            Ok((0..w.len()).map(|i| Some(w.value(i) < 10)).collect())
        })
        .unwrap();
    assert_eq!(gone.num_rows(), 2);
    assert_eq!(contents(&s), Model::from([(("a".into(), 10), 3)]));
    let stats = s.commit(0).unwrap();
    // Keys put and removed within one version count as removed.
    assert_eq!((stats.rows, stats.updated, stats.removed), (1, 1, 2));
}

#[test]
fn every_retained_version_reloads_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(Some(dir.path()), 3, 100);
    let mut history: Vec<Model> = Vec::new();
    for v in 0..8u64 {
        s.put(&rows(&[
            ("k", v as i64 % 3, v as i64),
            (&format!("n{v}"), 0, 1),
        ]))
        .unwrap();
        if v % 2 == 1 {
            s.remove_keys_where(|keys| {
                let k = keys.column(0).as_string::<i32>();
                Ok((0..k.len())
                    .map(|i| Some(k.value(i) == format!("n{}", v - 1)))
                    .collect())
            })
            .unwrap();
        }
        s.commit(v).unwrap();
        history.push(contents(&s));
    }
    assert!(dir.path().join("2.snapshot").exists());
    for (v, expected) in history.iter().enumerate() {
        let mut fresh = store(Some(dir.path()), 3, 100);
        fresh.load(Some(v as u64)).unwrap();
        assert_eq!(&contents(&fresh), expected, "version {v}");
    }
}

#[test]
fn the_background_thread_serves_job_after_job_and_outlives_a_panic() {
    let mut b = Background::default();
    assert_eq!(b.wait(), None, "no job yet");
    b.start(Box::new(|| Some(1)));
    assert_eq!(b.wait(), Some(Some(1)));
    assert_eq!(b.wait(), None, "taken once");
    b.start(Box::new(|| None));
    assert_eq!(b.wait(), Some(None));
    b.start(Box::new(|| panic!("a cleanup job failed")));
    assert_eq!(b.wait(), Some(None), "a panicked job prepared nothing");
    // The next job gets a new thread.
    b.start(Box::new(|| Some(3)));
    assert_eq!(b.wait(), Some(Some(3)));
    b.stop();
}

#[test]
fn an_eviction_is_written_as_its_bound_not_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(Some(dir.path()), 100, 100);
    let keys: Vec<String> = (0..50).map(|i| format!("k{i}")).collect();
    let window =
        |w: i64| -> Vec<(&str, i64, i64)> { keys.iter().map(|k| (k.as_str(), w, w + 1)).collect() };
    s.put(&rows(&window(0))).unwrap();
    s.put(&rows(&window(10))).unwrap();
    s.commit(0).unwrap();
    // Version 1: window 0 closes; then a late put lands in it again, and
    // window 20 opens and closes within the version.
    assert_eq!(s.remove_keys_until(1, 9).unwrap().num_rows(), 50);
    s.put(&rows(&[("again", 0, 7)])).unwrap();
    s.put(&rows(&window(20))).unwrap();
    assert_eq!(s.remove_keys_until(1, 0).unwrap().num_rows(), 1);
    s.put(&rows(&[("again", 0, 8)])).unwrap();
    let stats = s.commit(1).unwrap();
    assert_eq!(stats.removed, 51, "evicted rows count as removed");
    let expected = contents(&s);
    assert_eq!(expected.len(), 101);
    // The delta holds the bound and the rows live at the commit; no key of
    // window 0 is written as removed.
    let delta = decode_state_file(
        &dir.path().join("1.delta"),
        &fs::read(dir.path().join("1.delta")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        delta.schema().metadata().get(EVICTED).map(String::as_str),
        Some("[[1,9]]")
    );
    let deleted = delta.column(3).as_boolean();
    assert_eq!(deleted.true_count(), 0);
    assert_eq!(delta.num_rows(), 51, "window 20 and 'again'");
    let mut fresh = store(Some(dir.path()), 100, 100);
    fresh.load(Some(1)).unwrap();
    assert_eq!(contents(&fresh), expected);
    // A bound naming a column past the keys is damage, named.
    let mut bad = store(Some(dir.path()), 100, 100);
    let file = fs::read(dir.path().join("1.delta")).unwrap();
    let mut body = file[file.iter().position(|b| *b == b'\n').unwrap() + 1..].to_vec();
    let at = body.windows(7).position(|w| w == b"[[1,9]]").unwrap();
    body[at + 2] = b'7';
    fs::write(
        dir.path().join("1.delta"),
        sluice_common::durable::frame(&body),
    )
    .unwrap();
    let e = bad.load(Some(1)).unwrap_err().to_string();
    assert!(e.contains("1.delta") && e.contains("key column 7"), "{e}");
}

#[test]
fn a_rerun_batch_recommits_its_version_from_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(Some(dir.path()), 10, 100);
    s.put(&rows(&[("a", 0, 1)])).unwrap();
    s.commit(0).unwrap();
    s.put(&rows(&[("a", 0, 2)])).unwrap();
    s.commit(1).unwrap();
    // Crash after the state commit of batch 1 but before its commit record:
    // the re-run loads version 0 and applies batch 1 once more.
    let mut again = store(Some(dir.path()), 10, 100);
    again.load(Some(0)).unwrap();
    assert_eq!(contents(&again), Model::from([(("a".into(), 0), 1)]));
    again.put(&rows(&[("a", 0, 2)])).unwrap();
    again.commit(1).unwrap();
    let mut check = store(Some(dir.path()), 10, 100);
    check.load(Some(1)).unwrap();
    assert_eq!(contents(&check), Model::from([(("a".into(), 0), 2)]));
}

#[test]
fn fsynced_commits_write_the_next_delta_into_a_file_prepared_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StateStoreOptions {
        partitions: 3,
        snapshot_interval: 100,
        retain_versions: 100,
        durability: Durability::Fsync,
        snapshot_fallback: false,
        prepare_next: true,
    };
    let open = || {
        StateStore::new(
            Some(dir.path().to_path_buf()),
            key_schema(),
            value_schema(),
            opts,
        )
        .unwrap()
    };
    let mut s = open();
    s.put(&rows(&[("a", 0, 1)])).unwrap();
    s.commit(0).unwrap();
    s.wait_cleanup();
    // Version 1's delta exists, zeros, before batch 1 runs; loading the
    // committed version 0 does not read it.
    let next = dir.path().join("1.delta");
    let zeros = fs::read(&next).unwrap();
    assert!(zeros.len() >= 4096 && zeros.iter().all(|b| *b == 0));
    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
    let prepared = inode(&next);
    let mut fresh = open();
    fresh.load(Some(0)).unwrap();
    assert_eq!(contents(&fresh), Model::from([(("a".into(), 0), 1)]));
    // Version 1 is written into it, and reads back.
    s.put(&rows(&[("a", 0, 2), ("b", 0, 1)])).unwrap();
    s.commit(1).unwrap();
    assert_eq!(
        fs::metadata(&next).unwrap().len(),
        zeros.len() as u64,
        "written over the zeros, the size unchanged"
    );
    assert_eq!(inode(&next), prepared, "written in place, not renamed over");
    let mut fresh = open();
    fresh.load(Some(1)).unwrap();
    let v1 = Model::from([(("a".into(), 0), 2), (("b".into(), 0), 1)]);
    assert_eq!(contents(&fresh), v1);
    // A torn write of version 2 (a crash before its commit record) leaves
    // version 1 whole; the re-run, loading version 1, writes 2 again over
    // the torn bytes.
    s.wait_cleanup();
    fs::write(
        dir.path().join("2.delta"),
        b"sluice/1 len=900 crc32=00000000\nhalf",
    )
    .unwrap();
    let mut again = open();
    again.load(Some(1)).unwrap();
    assert_eq!(contents(&again), v1);
    again.put(&rows(&[("c", 0, 3)])).unwrap();
    again.commit(2).unwrap();
    let mut check = open();
    check.load(Some(2)).unwrap();
    assert_eq!(check.len(), 3);
    // And a prepared file the next version finds written over (longer
    // than the delta it gets, and not zeros) is rewritten whole, cut to
    // its new frame.
    fs::write(dir.path().join("2.delta"), vec![b'x'; 100_000]).unwrap();
    s.put(&rows(&[("c", 0, 3)])).unwrap();
    s.commit(2).unwrap();
    let mut check = open();
    check.load(Some(2)).unwrap();
    assert_eq!(check.len(), 3);
}

#[test]
fn retention_removes_old_files_and_keeps_retained_versions_loadable() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(Some(dir.path()), 2, 3);
    for v in 0..10u64 {
        s.put(&rows(&[("a", v as i64, 1)])).unwrap();
        s.commit(v).unwrap();
    }
    s.wait_cleanup();
    assert!(!dir.path().join("0.delta").exists());
    for v in 7..10 {
        let mut fresh = store(Some(dir.path()), 2, 3);
        fresh.load(Some(v)).unwrap();
        assert_eq!(fresh.len(), v as usize + 1);
    }
    let mut fresh = store(Some(dir.path()), 2, 3);
    let e = fresh.load(Some(2)).unwrap_err().to_string();
    assert!(e.contains("cannot be rebuilt"), "{e}");
}

#[test]
fn a_corrupt_state_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(Some(dir.path()), 10, 100);
    s.put(&rows(&[("a", 0, 1), ("b", 0, 1), ("c", 0, 1), ("d", 0, 1)]))
        .unwrap();
    s.commit(0).unwrap();
    let victim = dir.path().join("0.delta");
    let mut bytes = fs::read(&victim).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 0x40;
    fs::write(&victim, &bytes).unwrap();
    let mut fresh = store(Some(dir.path()), 10, 100);
    let e = fresh.load(Some(0)).unwrap_err().to_string();
    assert!(e.contains("0.delta") && e.contains("checksum"), "{e}");
}

/// One step of a store's life, for the model property.
#[derive(Debug, Clone)]
enum Op {
    /// Rows put together (a key twice: the last row counts).
    Put(Vec<(u8, i64, i64)>),
    Evict(i64),
    Remove(u8, i64),
    Commit,
    /// A crash before the commit: a fresh store loads the last committed version.
    Crash,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        4 => proptest::collection::vec((0u8..9, 0i64..3, 0i64..100), 1..5).prop_map(Op::Put),
        1 => (0i64..6).prop_map(Op::Evict),
        1 => (0u8..9, 0i64..3).prop_map(|(k, w)| Op::Remove(k, w)),
        3 => Just(Op::Commit),
        1 => Just(Op::Crash),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Any sequence of puts, evictions, commits and crashes leaves the
    /// state of a plain map, and every committed version reloads as it was.
    #[test]
    fn any_commits_crashes_and_loads_match_a_model(
        ops in proptest::collection::vec(op(), 1..60),
        snapshot_interval in 1u64..6,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store(Some(dir.path()), snapshot_interval, 1000);
        let mut model = Model::new();
        let mut committed: Vec<Model> = Vec::new();
        for op in ops {
            match op {
                Op::Put(put) => {
                    let named: Vec<(String, i64, i64)> =
                        put.iter().map(|(k, w, c)| (format!("k{k}"), *w, *c)).collect();
                    let refs: Vec<(&str, i64, i64)> =
                        named.iter().map(|(k, w, c)| (k.as_str(), *w, *c)).collect();
                    s.put(&rows(&refs)).unwrap();
                    for (k, w, c) in named {
                        model.insert((k, w), c);
                    }
                }
                Op::Evict(cut) => {
                    let pred = |keys: &RecordBatch| {
                        let w = keys.column(1).as_primitive::<Int64Type>();
                        Ok((0..w.len()).map(|i| Some(w.value(i) < cut)).collect())
                    };
                    // Every way of removing, which must agree: over whole
                    // rows, over keys alone, and through the time index.
                    let gone = match cut % 3 {
                        0 => s.remove_where(pred).unwrap(),
                        1 => s.remove_keys_where(pred).unwrap(),
                        _ => s.remove_keys_until(1, cut - 1).unwrap(),
                    };
                    let expected: Model = model
                        .iter()
                        .filter(|((_, w), _)| *w < cut)
                        .map(|(k, v)| (k.clone(), *v))
                        .collect();
                    proptest::prop_assert_eq!(&as_model(&gone), &expected);
                    model.retain(|(_, w), _| *w >= cut);
                }
                Op::Remove(k, w) => {
                    let k = format!("k{k}");
                    let probe = rows(&[(&k, w, 0)]);
                    let n = s.remove(&probe.columns()[..2]).unwrap();
                    let existed = model.remove(&(k, w)).is_some();
                    proptest::prop_assert_eq!(n, usize::from(existed));
                }
                Op::Commit => {
                    s.commit(committed.len() as u64).unwrap();
                    committed.push(model.clone());
                }
                Op::Crash => {
                    s = store(Some(dir.path()), snapshot_interval, 1000);
                    let last = committed.len().checked_sub(1);
                    s.load(last.map(|v| v as u64)).unwrap();
                    model = last.map(|v| committed[v].clone()).unwrap_or_default();
                    proptest::prop_assert_eq!(&contents(&s), &model);
                }
            }
            proptest::prop_assert_eq!(&contents(&s), &model);
            // Every key (and one never put), asked for twice: each found once.
            let mut asked: Vec<(&str, i64, i64)> =
                model.keys().map(|(k, w)| (k.as_str(), *w, 0)).collect();
            asked.extend(asked.clone());
            asked.push(("never", 0, 0));
            let probe = rows(&asked);
            let got = s.get(&probe.columns()[..2]).unwrap();
            proptest::prop_assert_eq!(&as_model(&got), &model);
            proptest::prop_assert_eq!(got.num_rows(), model.len());
        }
        for (v, m) in committed.iter().enumerate() {
            let mut fresh = store(Some(dir.path()), snapshot_interval, 1000);
            fresh.load(Some(v as u64)).unwrap();
            proptest::prop_assert_eq!(&contents(&fresh), m, "version {}", v);
        }
    }
}

#[test]
fn a_state_directory_reads_alone_and_refuses_another_shape() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(Some(dir.path()), 10, 100);
    s.put(&rows(&[("a", 0, 4), ("b", 10, 5)])).unwrap();
    s.commit(0).unwrap();
    s.put(&rows(&[("a", 0, 6)])).unwrap();
    s.commit(1).unwrap();
    let (batch, keys) = read_state(dir.path(), 0).unwrap();
    assert_eq!((batch.num_rows(), keys), (2, 2));
    let (batch, _) = read_state(dir.path(), 1).unwrap();
    let c = batch.column(2).as_primitive::<Int64Type>();
    assert_eq!(c.values().iter().sum::<i64>(), 11);

    let opts = StateStoreOptions {
        partitions: 5,
        ..StateStoreOptions::default()
    };
    let e = StateStore::new(
        Some(dir.path().to_path_buf()),
        key_schema(),
        value_schema(),
        opts,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("written with 3 partitions but this query uses 5"),
        "{e}"
    );
    let other = Arc::new(Schema::new(vec![Field::new("sum", DataType::Int64, false)]));
    let opts = StateStoreOptions {
        partitions: 3,
        ..StateStoreOptions::default()
    };
    let e = StateStore::new(Some(dir.path().to_path_buf()), key_schema(), other, opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("other group keys or aggregates"), "{e}");
}

#[test]
fn a_damaged_snapshot_is_named_and_with_fallback_rebuilt_from_an_older_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(Some(dir.path()), 10, 30);
    let mut model = Model::new();
    for v in 0..25u64 {
        let data = [("a", (v % 3) as i64, v as i64), ("b", 7, v as i64 * 2)];
        s.put(&rows(&data)).unwrap();
        for (k, w, c) in data {
            model.insert((k.to_string(), w), c);
        }
        s.commit(v).unwrap();
    }
    s.wait_cleanup();
    // Versions 9 and 19 wrote snapshots; damage 19's in one of three ways.
    let path = dir.path().join("19.snapshot");
    let good = std::fs::read(&path).unwrap();
    for damage in ["truncate", "flip", "zero"] {
        let mut bytes = good.clone();
        match damage {
            "truncate" => bytes.truncate(bytes.len() / 2),
            "flip" => {
                let i = bytes.len() - 3;
                bytes[i] ^= 0x40;
            }
            _ => bytes.iter_mut().for_each(|b| *b = 0),
        }
        std::fs::write(&path, bytes).unwrap();
        let mut fresh = store(Some(dir.path()), 10, 30);
        let e = fresh.load(Some(24)).unwrap_err().to_string();
        assert!(e.contains("19.snapshot"), "{damage}: {e}");
    }
    let mut fresh = store(Some(dir.path()), 10, 30);
    let e = fresh.load(Some(24)).unwrap_err().to_string();
    assert!(
        e.contains("19.snapshot") && e.contains("state_snapshot_fallback"),
        "{e}"
    );

    let mut opts = fresh.options;
    opts.snapshot_fallback = true;
    let mut fallback = StateStore::new(
        Some(dir.path().to_path_buf()),
        key_schema(),
        value_schema(),
        opts,
    )
    .unwrap();
    fallback.load(Some(24)).unwrap();
    assert_eq!(contents(&fallback), model);
    assert_eq!(fallback.fallbacks().len(), 1, "{:?}", fallback.fallbacks());
    assert!(fallback.fallbacks()[0].contains("19.snapshot"));

    // A damaged delta has no safe fallback: it is named, fallback or not.
    let delta = dir.path().join("23.delta");
    let mut bytes = std::fs::read(&delta).unwrap();
    bytes.truncate(bytes.len() - 1);
    std::fs::write(&delta, bytes).unwrap();
    let e = fallback.load(Some(24)).unwrap_err().to_string();
    assert!(e.contains("23.delta"), "{e}");
}

#[test]
fn a_state_file_declaring_huge_lengths_is_refused_before_any_allocation() {
    let path = Path::new("state/0/3.delta");
    // Valid frames around bodies whose IPC lengths lie.
    for body in [
        &b"[\"4.json\"]"[..],
        &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f][..],
        &[0xff, 0xff, 0xff, 0xff, 0x08, 0x00, 0x00, 0x00, 1, 2, 3][..],
    ] {
        let e = decode_state_file(path, &durable::frame(body))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("state/0/3.delta") && e.contains("Arrow data"),
            "{e}"
        );
    }
    // A real state file still reads.
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(Some(dir.path()), 10, 10);
    s.put(&rows(&[("a", 0, 1)])).unwrap();
    s.commit(0).unwrap();
    let f = dir.path().join("0.delta");
    let bytes = std::fs::read(&f).unwrap();
    assert!(decode_state_file(&f, &bytes).is_ok());
}

#[test]
fn a_directory_per_partition_is_read_and_converted_by_its_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(Some(dir.path()), 3, 100);
    for v in 0..6u64 {
        s.put(&rows(&[("a", v as i64, 1), ("b", 0, v as i64)]))
            .unwrap();
        if v == 4 {
            s.remove(&[
                Arc::new(StringArray::from(vec!["a"])) as ArrayRef,
                Arc::new(Int64Array::from(vec![1])) as ArrayRef,
            ])
            .unwrap();
        }
        s.commit(v).unwrap();
    }
    s.wait_cleanup();
    let model = contents(&s);
    // The older layout: every file in each of the 3 partition directories
    // (each replays the whole history, so together they hold the same rows).
    let files: Vec<_> = plan::list(dir.path()).unwrap();
    for p in 0..3 {
        let pdir = dir.path().join(p.to_string());
        fs::create_dir(&pdir).unwrap();
        for f in &files {
            fs::copy(dir.path().join(f.name()), pdir.join(f.name())).unwrap();
        }
    }
    for f in &files {
        fs::remove_file(dir.path().join(f.name())).unwrap();
    }
    // A reader reads it as it is.
    let (batch, keys) = read_state(dir.path(), 5).unwrap();
    assert_eq!((batch.num_rows(), keys), (model.len(), 2));
    assert!(dir.path().join("0").exists(), "a reader converts nothing");
    // The owner converts it: one snapshot of the version, no partition
    // directories, and the store goes on from there.
    let mut owner = store(Some(dir.path()), 3, 100);
    owner.load(Some(5)).unwrap();
    assert_eq!(contents(&owner), model);
    assert!(dir.path().join("5.snapshot").exists());
    assert!((0..3).all(|p| !dir.path().join(p.to_string()).exists()));
    owner.put(&rows(&[("c", 9, 9)])).unwrap();
    owner.commit(6).unwrap();
    let mut fresh = store(Some(dir.path()), 3, 100);
    fresh.load(Some(6)).unwrap();
    assert_eq!(fresh.len(), model.len() + 1);
}
