//! Any text through the SQL front end (statement parsing, CREATE SOURCE /
//! SINK options, window rewrites): an error or statements, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(sql) = std::str::from_utf8(data) {
        let _ = sluice_planner::parse_script(sql);
    }
});
