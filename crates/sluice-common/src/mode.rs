//! Output modes: how a sink receives a query's results.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// How a sink receives results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputMode {
    /// Rows are emitted once and never change (default).
    #[default]
    Append,
    /// Each batch emits the result rows that changed in it.
    Update,
    /// Each batch emits the whole result table (aggregates only).
    Complete,
    /// Each batch emits changes with an `_op` column.
    Changelog,
}

impl FromStr for OutputMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "append" => Ok(OutputMode::Append),
            "update" => Ok(OutputMode::Update),
            "complete" => Ok(OutputMode::Complete),
            "changelog" => Ok(OutputMode::Changelog),
            other => Err(Error::plan(format!(
                "output_mode '{other}' is not one of append, update, complete, changelog"
            ))),
        }
    }
}

impl fmt::Display for OutputMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OutputMode::Append => "append",
            OutputMode::Update => "update",
            OutputMode::Complete => "complete",
            OutputMode::Changelog => "changelog",
        })
    }
}
