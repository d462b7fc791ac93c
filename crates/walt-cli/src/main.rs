//! `walt`: the command-line client of a walt server.

mod advanced;
mod chunks;
mod config;
mod help;
mod image;
mod node;
// Virtual node consoles (issue 17).
mod console;
mod progress;
mod prompt;
mod table;
mod term;
mod tls;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// WalT: manage the OS images of your testbed nodes.
#[derive(Parser, Debug)]
#[command(
    name = "walt",
    version,
    about,
    propagate_version = true,
    // `walt help` is WalT's help topics (see help.rs); `--help` stays.
    disable_help_subcommand = true
)]
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
    /// Help topics: how images are built, copied, shared (walt help list).
    #[command(subcommand)]
    Help(help::HelpCommand),
}

#[derive(Subcommand, Debug)]
enum AdvancedCommand {
    /// Forget the certificate pinned for the walt server (to accept a new
    /// one: the next command pins the certificate the server presents).
    ForgetServer,
    /// Look for newer default images of the node models on the server's
    /// sources, fetch them and make the nodes using them boot them.
    UpdateDefaultImages,
    // Shell completion and man pages (issue 15 item 11), see help.rs.
    /// Print the bash completion script of walt (see walt help show shell-completion).
    DumpBashAutocomplete,
    /// Print the zsh completion script of walt (see walt help show shell-completion).
    DumpZshAutocomplete,
    /// Write the man pages of walt (walt.1, walt-image.1, ...) into a directory.
    DumpManPages {
        /// The directory (created if needed); existing pages are replaced.
        dir: std::path::PathBuf,
    },
    /// Update hub metadata (docker images pushed without walt): rebuild the
    /// walt_metadata image of your Docker hub account from its repositories.
    UpdateHubMeta {
        /// Update waltplatform user (walt devs only).
        #[arg(long)]
        waltplatform_user: bool,
    },
    /// Alias to 'update-hub-meta' subcommand.
    RescanHubAccount {
        /// Update waltplatform user (walt devs only).
        #[arg(long)]
        waltplatform_user: bool,
    },
    /// Fix the owner of images: every image of another user becomes yours
    /// (maintenance, when that user no longer works with walt).
    FixImageOwner {
        /// Yes, I know, do it!
        #[arg(long)]
        yes_i_know_do_it_please: bool,
        other_user: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Help topics, completions and man pages need no server: answered first.
    let local = match &cli.command {
        Command::Help(cmd) => Some(help::run(cmd)),
        Command::Advanced(AdvancedCommand::DumpBashAutocomplete) => {
            Some(help::dump_completion(Cli::command(), help::Shell::Bash))
        }
        Command::Advanced(AdvancedCommand::DumpZshAutocomplete) => {
            Some(help::dump_completion(Cli::command(), help::Shell::Zsh))
        }
        Command::Advanced(AdvancedCommand::DumpManPages { dir }) => {
            Some(help::dump_man_pages(Cli::command(), dir))
        }
        _ => None,
    };
    if let Some(result) = local {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {}", walt_core::text::one_line(&format!("{e:#}")));
                ExitCode::FAILURE
            }
        };
    }
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
            Command::Help(_)
            | Command::Advanced(
                AdvancedCommand::DumpBashAutocomplete
                | AdvancedCommand::DumpZshAutocomplete
                | AdvancedCommand::DumpManPages { .. },
            ) => Ok(()),
            Command::Advanced(
                AdvancedCommand::UpdateHubMeta { waltplatform_user }
                | AdvancedCommand::RescanHubAccount { waltplatform_user },
            ) => advanced::update_hub_meta(waltplatform_user).await,
            Command::Advanced(AdvancedCommand::FixImageOwner {
                yes_i_know_do_it_please,
                other_user,
            }) => advanced::fix_image_owner(&other_user, yes_i_know_do_it_please).await,
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
