//! Loading policy files: YAML → serde structs → validated [`Policy`], with errors that name the
//! file, the line and the field.

use std::path::{Path, PathBuf};

use thiserror::Error;

use super::Policy;

/// One problem in one policy file.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}:{}: {field}: {message}", file.display(), line.map(|l| l.to_string()).unwrap_or_else(|| "?".into()))]
pub struct PolicyError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The field path, for example `orgs.myorg1.devices.sensor/dev001.token`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Every problem found in a load.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct PolicyErrors(pub Vec<PolicyError>);

/// Loads one YAML file, or every `*.yaml`/`*.yml` file of a folder (merged; an org defined twice
/// is an error).
pub fn load_policies(path: &Path) -> Result<Policy, PolicyErrors> {
    todo!()
}
