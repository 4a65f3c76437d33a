use std::io::Write;

use anyhow::Context;
use clap::Parser;
use collab_server::Config;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    actix_web::rt::System::new()
        .block_on(collab_server::serve(config, |addr| {
            // Scripts and tests read the bound port from this line (with --addr HOST:0).
            println!("listening on {addr}");
            let _ = std::io::stdout().flush();
        }))
        .context("collab server")
}
