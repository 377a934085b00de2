use clap::Parser;
use spiced::cli::{Cli, Command, ConfigAction, LogFormat};
use spiced::config::Config;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format;
    init_tracing(format);
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once: as a log record where logs are machine-read, else as a line on stderr.
            match format {
                LogFormat::Json => tracing::error!("{e:#}"),
                LogFormat::Text => eprintln!("spiced: {e:#}"),
            }
            if e.is::<Violations>() { ExitCode::from(2) } else { ExitCode::FAILURE }
        }
    }
}

/// `spiced verify` found the log or its index breaking a guarantee: exit code 2, apart from
/// every other error (1).
#[derive(Debug, thiserror::Error)]
#[error("{0} violation(s) found")]
struct Violations(usize);

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Needs no configuration: print and leave.
    match cli.command {
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "spiced", &mut std::io::stdout());
            return Ok(());
        }
        Command::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            return Ok(());
        }
        _ => {}
    }
    let mut config = Config::load_unvalidated(cli.config.as_deref(), std::env::vars())?;
    config.auth.insecure_no_auth = cli.insecure_no_auth;
    config.validate()?;
    let shutdown = CancellationToken::new();
    spiced::shutdown::install(shutdown.clone())?;
    spiced::systemd::spawn_watchdog(shutdown.clone());
    match cli.command {
        Command::Serve => spiced::serve::run(config, shutdown).await,
        Command::Relay(args) => {
            spiced::relay::run_with(config, args.options(), shutdown, Default::default()).await
        }
        Command::Worker { roles } => spiced::worker::run_roles(config, &roles, shutdown).await,
        Command::Project(spiced::cli::ProjectArgs { action: Some(spiced::cli::ProjectAction::Failures { action, schema }), .. }) => {
            failures(&config, action, &schema).await
        }
        Command::Project(args) if args.rebuild => rebuild(&config, args).await,
        Command::Project(_) => spiced::project::run(config, shutdown).await,
        Command::Dev => spiced::dev::run(config, shutdown).await,
        Command::Migrate => {
            let db = spiced::db::Database::open(&config.database).await?;
            let applied = db.migrate().await?;
            println!("{}: {} migration(s) applied {:?}", db.backend_name(), applied.len(), applied);
            Ok(())
        }
        Command::Verify { from_position } => {
            let report = spiced::ops::verify::run(&config, from_position).await?;
            report.print();
            if report.violations() > 0 {
                return Err(Violations(report.violations()).into());
            }
            println!("verify: the log and its index hold every guarantee");
            Ok(())
        }
        Command::Status { json: true } => {
            spiced::ops::status::print_json(&spiced::ops::status::read_pipeline(&config).await?);
            Ok(())
        }
        Command::Status { json: false } => {
            spiced::ops::status::print(&spiced::ops::status::read(&config).await?);
            Ok(())
        }
        Command::Log { action } => {
            use spiced::cli::LogAction;
            use spiced::ops::log;
            match action {
                LogAction::Get { position } => log::get(&config, position).await,
                LogAction::Export { from_position, to_position, from_time, to_time } => {
                    log::export(&config, log::Range { from_position, to_position, from_time, to_time }).await
                }
                LogAction::Tail { from_position } => log::tail(&config, from_position, shutdown).await,
            }
        }
        Command::Dlq { action } => {
            use spiced::cli::DlqAction;
            use spiced::ops::dlq;
            match action {
                DlqAction::List { role } => dlq::list(&config, role).await,
                DlqAction::Show { event_id, role } => dlq::show(&config, role, event_id).await,
                DlqAction::Redrive { event_id, role } => dlq::redrive(&config, role, event_id).await,
            }
        }
        Command::Completions { .. } | Command::Man => Ok(()),
        Command::Config { action: ConfigAction::Check } => {
            println!("# The effective configuration, secrets redacted.");
            println!("# `spiced dev` runs its workers and projection from the log itself: it uses no");
            println!("# [kafka], [topics] or [relay] key, nor project.source, project.group and");
            println!("# project.session_timeout_ms.");
            print!("{}", config.to_redacted_toml());
            Ok(())
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPICED_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal, never into a file, a pipe or the journal.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn failures(config: &Config, action: Option<spiced::cli::FailuresAction>, schema: &str) -> anyhow::Result<()> {
    use spiced::cli::FailuresAction;
    use spiced::project::failures;
    let schema = spiced::db::read::ReadSchema::named(schema)?;
    match action.unwrap_or(FailuresAction::List) {
        FailuresAction::List => failures::list(config, &schema).await,
        FailuresAction::Retry { event_id } => failures::print(&failures::retry(config, &schema, event_id).await?),
    }
}

async fn rebuild(config: &Config, args: spiced::cli::ProjectArgs) -> anyhow::Result<()> {
    use spiced::project::rebuild::{run, Options, Until};
    let until = match args.until.as_deref() {
        Some(s) => Until::parse(s)?,
        None => Until::Head,
    };
    let report = run(config, Options { until, target: args.target_schema, no_swap: args.no_swap }).await?;
    println!(
        "rebuild: {} events to log position {} in {:.1}s ({:.0} events/s) into schema {}",
        report.events,
        report.position,
        report.elapsed.as_secs_f64(),
        report.events_per_second(),
        report.target
    );
    if report.refused > 0 {
        println!(
            "rebuild: {} event(s) refused by the read store are missing from schema {}: see `spiced project failures`",
            report.refused,
            if report.swapped { spiced::db::read::LIVE_SCHEMA } else { &report.target }
        );
    }
    if report.swapped {
        println!("rebuild: swapped in as the live read models; the previous ones are now in schema {}", report.target);
    }
    Ok(())
}
