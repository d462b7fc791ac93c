//! `walt-server-setup`: checks (and, later, edits) the walt server configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use walt_core::config::{Registry, ServerConfig};

/// Set up and configure the walt server.
#[derive(Parser, Debug)]
#[command(name = "walt-server-setup", version, about)]
struct Args {
    /// Validate the configuration file and report what it configures.
    #[arg(long)]
    check: bool,
    /// Interactive configuration editor (network, then image registries).
    #[arg(long)]
    edit_conf: bool,
    /// Configuration file.
    #[arg(long, default_value = "/etc/walt/server.conf")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = if args.edit_conf {
        Err(anyhow::anyhow!(
            "the interactive editor is not available in this version; edit {} by hand and check it with --check",
            args.config.display()
        ))
    } else {
        check(&args.config)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &PathBuf) -> anyhow::Result<()> {
    let config = match std::fs::read_to_string(path) {
        Ok(text) => ServerConfig::parse(&path.display().to_string(), &text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "{} does not exist: the server uses the defaults (Docker Hub only)",
                path.display()
            );
            ServerConfig::default_config()
        }
        Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    };
    println!("{}: OK", path.display());
    for r in &config.registries {
        match r {
            Registry::Hub(_) => println!("  hub: docker-hub"),
            Registry::V2(v) => println!(
                "  {}: docker-registry-v2 {} (auth {:?})",
                v.label,
                v.base_url(),
                v.auth
            ),
        }
    }
    Ok(())
}
