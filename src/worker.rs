//! `spiced worker`: carries out commands exactly once in effect.
//!
//! Not built yet (issue #4): the subcommand exists so deployments and scripts can be written
//! against the final CLI, and it refuses to run rather than pretending to work.

use crate::config::Config;
use tokio_util::sync::CancellationToken;

pub async fn run(_config: Config, _shutdown: CancellationToken) -> anyhow::Result<()> {
    anyhow::bail!("`spiced worker` is not implemented in this build yet (issue #4)")
}
