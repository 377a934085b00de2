//! `spiced status`: where each stage of the pipeline is, as one table of its clocks, each a
//! log position: committed (the log itself), allocated (the index head), published (the relay
//! checkpoint; none under `spiced dev`), processed by the embedded
//! workers (only `spiced dev` has them), and applied to the read models (the projection),
//! with how many events the read store refused (recorded in `projection_failures`, missing
//! from the read models); then how many commands have their outcome, and each running stage.

use crate::config::Config;
use crate::db::Database;
use crate::envelope::Kind;
use crate::log::EventLog;
use crate::status::{Clock, PipelineStatus, StageStatus};

/// `spiced status`: the pipeline's clocks (`crate::status`), and for the table how many
/// commands have their outcome.
pub struct Status {
    pub pipeline: PipelineStatus,
    pub commands: usize,
    pub outcomes: usize,
}

/// Reads the clocks and counts the commands (the count reads the whole index, which is why
/// only the table has it, not `--json` or the API).
pub async fn read(config: &Config) -> anyhow::Result<Status> {
    let db = Database::open(&config.database).await?;
    let log = EventLog::open(&config.log)?;
    let pipeline = crate::status::read(config, &db, &log).await?;
    let rows = db.index.all_rows().await?;
    Ok(Status {
        pipeline,
        commands: rows.iter().filter(|r| r.kind == Kind::Command).count(),
        outcomes: rows.iter().filter(|r| r.kind == Kind::Domain).count(),
    })
}

/// The clocks alone: what `spiced status --json` prints, the same as `GET /api/v1/status`.
pub async fn read_pipeline(config: &Config) -> anyhow::Result<PipelineStatus> {
    let db = Database::open(&config.database).await?;
    let log = EventLog::open(&config.log)?;
    Ok(crate::status::read(config, &db, &log).await?)
}

/// `spiced status --json`: one JSON object.
pub fn print_json(s: &PipelineStatus) {
    println!("{}", serde_json::to_string_pretty(s).expect("the status serialises"));
}

fn clock_line(name: &str, clock: &Clock) {
    println!("{:<34} {:>12} {:>12}", name, clock.position, clock.behind);
}

pub fn print(s: &Status) {
    let p = &s.pipeline;
    println!("{:<34} {:>12} {:>12}", "clock", "position", "behind");
    println!("{:<34} {:>12} {:>12}", "committed to the log (segments)", p.log_head, "-");
    clock_line("allocated (index head)", &p.index_head);
    // A clock nothing in this deployment moves says so, rather than looking like a fault.
    match (&p.relay, &p.embedded_workers) {
        (_, Some(embedded)) => {
            println!("{:<34} {:>25}", "published to Kafka (relay)", "not used (spiced dev)");
            clock_line("embedded workers (spiced dev)", embedded);
        }
        (relay, None) => {
            let relay = relay.unwrap_or(Clock { position: 0, behind: p.log_head });
            clock_line("published to Kafka (relay)", &relay);
            println!("{:<34} {:>25}", "embedded workers (spiced dev)", "not used (workers run)");
        }
    }
    match &p.projection {
        Some(c) => clock_line("read models (projection)", c),
        None => println!("{:<34} {:>12} {:>12}", "read models (projection)", "-", "-"),
    }
    // How many events the read models lack although their position is past them: the
    // "behind" column, like the other clocks' distance from the log.
    let refused = p.projection_refused.map_or("-".to_string(), |n| n.to_string());
    println!("{:<34} {:>12} {:>12}", "read models: events refused", "-", refused);
    if p.projection_refused.is_some_and(|n| n > 0) {
        println!("  (`spiced project failures` lists them; fix the cause, then `spiced project failures retry`)");
    }
    println!(
        "{:<34} {:>12} {:>12}",
        "commands with an outcome",
        s.outcomes,
        s.commands.saturating_sub(s.outcomes)
    );
    print_stages(&p.stages);
}

/// One line per running stage: its position, how long since it last moved, whether work
/// waits, and whether its process still reports at all.
fn print_stages(stages: &[StageStatus]) {
    println!();
    if stages.is_empty() {
        println!("stages: none reporting (no relay, worker or projection running against this database)");
        return;
    }
    println!("{:<20} {:<28} {:>10} {:>14} {:>7}  state", "stage", "process", "position", "last progress", "work");
    for r in stages {
        let position = r.position.map_or("-".to_string(), |c| c.position.to_string());
        let work = if r.work_waiting { "waiting" } else { "none" };
        println!(
            "{:<20} {:<28} {:>10} {:>12.1} s {:>7}  {}",
            r.stage, r.instance, position, r.seconds_since_progress, work, state_line(r)
        );
    }
}

fn state_line(r: &StageStatus) -> String {
    let error = r.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
    match r.state.as_str() {
        "not_reporting" => {
            let silent = (chrono::Utc::now() - r.reported_at).num_seconds();
            format!("not reporting for {silent} s (stopped, frozen or cut off)")
        }
        "stalled" => format!("STALLED{error}"),
        "failing" => format!("failing{error}"),
        other => other.to_string(),
    }
}
