//! Any bytes as a checkpoint file of every kind Sluice reads back on a
//! restart: the frame check, then plan, commit, metadata and file-sink
//! manifest entries, and state deltas/snapshots; and as a segment of the
//! batch log, last or not. An error naming the file, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sluice_common::durable::{frame, unframe};
use sluice_connectors::file_sink::Manifest;
use sluice_state::checkpoint::{CommitEntry, Metadata, OffsetEntry};
use sluice_state::log::{LogContents, read_segment};
use sluice_state::store::decode_state_file;

fn entries(path: &Path, body: &[u8]) {
    let _ = serde_json::from_slice::<OffsetEntry>(body);
    let _ = serde_json::from_slice::<CommitEntry>(body);
    let _ = serde_json::from_slice::<Metadata>(body);
    let _ = serde_json::from_slice::<Manifest>(body);
    if let Err(e) = decode_state_file(path, &frame(body)) {
        assert!(e.to_string().contains("ckpt/x"), "names the file: {e}");
    }
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new("ckpt/x");
    // As found on disk (mostly a bad frame)...
    match unframe(path, data) {
        Ok(body) => entries(path, body),
        Err(e) => assert!(e.to_string().contains("ckpt/x"), "names the file: {e}"),
    }
    // ...and as a body behind a valid frame, to reach the parsers.
    entries(path, data);
    // As a batch log segment: a torn end is reported, anything else bad is
    // an error naming the segment.
    for last in [false, true] {
        let mut log = LogContents::default();
        if let Err(e) = read_segment(&mut log, path, data, last) {
            assert!(e.to_string().contains("ckpt/x"), "names the segment: {e}");
        }
        assert!(log.torn.is_none() || last, "only the last segment is torn");
    }
});
