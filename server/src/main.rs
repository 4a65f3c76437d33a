use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use clap::Parser;
use collab_server::auth::Auth;
use collab_server::config::{Cli, Command, TokenArgs};
use tracing_subscriber::EnvFilter;

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
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
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
