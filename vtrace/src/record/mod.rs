//! `vtrace record` / `vtrace report`: placeholder until record files land.
use anyhow::Result;

use crate::cli::{RecordArgs, ReportArgs};

pub fn record(_args: &RecordArgs) -> Result<()> {
    anyhow::bail!("vtrace record is not implemented yet")
}

pub fn report(_args: &ReportArgs) -> Result<()> {
    anyhow::bail!("vtrace report is not implemented yet")
}
