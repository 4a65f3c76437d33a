use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use clap::Parser;
use collab_server::auth::Auth;
use collab_server::config::{Cli, Command, TokenArgs};
use collab_server::tools::{self, backup, ToolError};
use tracing_subscriber::EnvFilter;

mod allocator;

/// Exit code for settings that cannot work, as clap uses for a bad flag.
const USAGE: u8 = 2;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Err(e) = collab_server::config_file::apply(&args) {
        eprintln!("error: {e}");
        return ExitCode::from(USAGE);
    }
    let cli = Cli::parse_from(args);
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    if cli.config.log_format == "json" {
        // One object per line; the fields of the enclosing spans (doc, conn, sub) are
        // flattened in, so a log collector can filter by document or connection.
        logs.json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        // Colour only for a person at a terminal: in files and log collectors the escape
        // codes are noise.
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }
    // The data tools need no secrets: they run before the access settings are checked.
    if let Some(code) = data_tool(&cli) {
        return code;
    }
    let secrets = match cli.config.secrets() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(USAGE);
        }
    };
    let result = match cli.command {
        Some(Command::Token(args)) => token(&args, secrets.auth.as_ref()),
        None => serve(cli.config, secrets),
        Some(_) => unreachable!("data_tool handles the data tools"),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // A data folder held by another process is one line, not a chain of causes.
            if let Some(collab_server::ServerError::OpenStore { path, source }) =
                e.downcast_ref::<collab_server::ServerError>()
            {
                if tools::is_locked(source) {
                    eprintln!("error: {}", ToolError::Locked(path.clone()));
                    return ExitCode::FAILURE;
                }
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `collab docs|backup|restore|check`; `None` for the other commands.
fn data_tool(cli: &Cli) -> Option<ExitCode> {
    let data_dir = &cli.config.data_dir;
    let result = match cli.command.as_ref()? {
        Command::Token(_) => return None,
        Command::Docs(command) => tools::docs(data_dir, command).map(|()| ExitCode::SUCCESS),
        Command::Backup(args) => tools::open_existing(data_dir).and_then(|store| {
            let (manifest, skipped) = backup::backup_store(&store, &args.dir)?;
            for s in &skipped {
                eprintln!("error: document {:?} left out: {}", s.name, s.why);
            }
            eprintln!(
                "{} documents ({} bytes) written to {}",
                manifest.documents.len(),
                manifest.total_bytes(),
                args.dir.display()
            );
            Ok(if skipped.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }),
        Command::Restore(args) => backup::restore(data_dir, &args.dir).map(|manifest| {
            eprintln!(
                "{} documents ({} bytes) restored into {}",
                manifest.documents.len(),
                manifest.total_bytes(),
                data_dir.display()
            );
            ExitCode::SUCCESS
        }),
        Command::Check => tools::check(data_dir).map(|damaged| {
            if damaged.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }),
    };
    Some(result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        if e.is_usage() {
            ExitCode::from(USAGE)
        } else {
            ExitCode::FAILURE
        }
    }))
}

fn serve(
    config: collab_server::Config,
    secrets: collab_server::Secrets,
) -> anyhow::Result<ExitCode> {
    actix_web::rt::System::new()
        .block_on(collab_server::serve(config, secrets, |addr| {
            // Scripts and tests read the bound port from this line (with --addr HOST:0).
            println!("listening on {addr}");
            let _ = std::io::stdout().flush();
        }))
        .context("collab server")?;
    Ok(ExitCode::SUCCESS)
}

/// `collab token`: prints a token signed with the configured secret.
fn token(
    args: &TokenArgs,
    secret: Option<&collab_server::auth::Secret>,
) -> anyhow::Result<ExitCode> {
    if secret.is_none() {
        eprintln!("error: collab token needs the secret: --auth-secret-file, --auth-secret or COLLAB_AUTH_SECRET");
        return Ok(ExitCode::from(USAGE));
    }
    let minted = Auth::new(secret, false)
        .mint(
            &args.doc,
            args.perm,
            args.ttl,
            args.sub.clone(),
            SystemTime::now(),
        )
        .context("cannot mint the token")?;
    println!("{}", minted.token);
    Ok(ExitCode::SUCCESS)
}
