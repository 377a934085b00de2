//! `spiced relay`: tails the event log and publishes it to Kafka.
//!
//! Not built yet (issue #3): the subcommand exists so deployments and scripts can be written
//! against the final CLI, and it refuses to run rather than pretending to work.

use crate::config::Config;
use tokio_util::sync::CancellationToken;

pub async fn run(_config: Config, _shutdown: CancellationToken) -> anyhow::Result<()> {
    anyhow::bail!("`spiced relay` is not implemented in this build yet (issue #3)")
}
