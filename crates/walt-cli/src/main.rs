//! `walt`: the command-line client of a walt server.

mod advanced;
mod chunks;
mod config;
mod image;
mod node;
// Virtual node consoles (issue 17).
mod console;
mod progress;
mod prompt;
mod table;
mod tls;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// WalT: manage the OS images of your testbed nodes.
#[derive(Parser, Debug)]
#[command(name = "walt", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Manage images: show, search, clone, publish, remove, rename, duplicate, squash, shell, cp, build.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Manage nodes: show, boot, rename, create, remove, reboot, config, console.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// Show the devices of the walt network.
    #[command(subcommand)]
    Device(node::DeviceCommand),
    /// Advanced commands.
    #[command(subcommand)]
    Advanced(AdvancedCommand),
}

#[derive(Subcommand, Debug)]
enum AdvancedCommand {
    /// Forget the certificate pinned for the walt server (to accept a new
    /// one: the next command pins the certificate the server presents).
    ForgetServer,
    /// Look for newer default images of the node models on the server's
    /// sources, fetch them and make the nodes using them boot them.
    UpdateDefaultImages,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Image(cmd) => image::run(cmd).await,
            Command::Node(cmd) => node::run(cmd).await,
            Command::Device(cmd) => node::run_device(cmd).await,
            Command::Advanced(AdvancedCommand::ForgetServer) => tls::forget_server(),
            Command::Advanced(AdvancedCommand::UpdateDefaultImages) => {
                advanced::update_default_images().await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<image::shell::ExitWith>().is_some() => ExitCode::from(
            e.downcast_ref::<image::shell::ExitWith>()
                .map_or(1, |x| x.0),
        ),
        Err(e) if e.downcast_ref::<image::build::UsageError>().is_some() => {
            eprintln!("error: {}", walt_core::text::one_line(&e.to_string()));
            ExitCode::from(2)
        }
        Err(e) => {
            // One line, whatever the cause chain; text from the server or a
            // registry may carry control characters, shown escaped.
            let msg = format!("{e:#}");
            eprintln!("error: {}", walt_core::text::one_line(&msg));
            ExitCode::FAILURE
        }
    }
}
