//! `walt image ...`

use anyhow::anyhow;
use clap::Subcommand;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use walt_core::CloneUrl;
use walt_proto::v1::{self as pb, clone_event::Event, images_client::ImagesClient};

use crate::config::{self, Settings};
use crate::progress::Bars;
use crate::prompt;
use crate::table;

#[path = "search.rs"]
mod search;

#[path = "publish.rs"]
mod publish;

#[path = "shell.rs"]
pub mod shell;

#[path = "cp.rs"]
mod cp;

#[path = "build.rs"]
pub mod build;

#[derive(Subcommand, Debug, Clone)]
pub enum ImageCommand {
    /// Show your images (the working set).
    Show {
        /// Also show the images of other users, with their clone URL.
        #[arg(long)]
        all: bool,
        /// Print only the image names, one per line.
        #[arg(long)]
        names_only: bool,
        /// Check that the content of every image (blobs, layers) is in the
        /// store; report what is not.
        #[arg(long)]
        refresh: bool,
    },
    /// Copy an image into your working set.
    #[command(after_help = "Clone URLs and where images come from: walt help show registries")]
    Clone {
        /// Overwrite an image of the same name.
        #[arg(long)]
        force: bool,
        /// Clone URL: <location>:<user>/<name>[:<tag>] (see walt image search).
        url: String,
        /// Name in your working set (default: the remote name).
        name: Option<String>,
    },
    /// Search the images of every source (other users, registries).
    #[command(after_help = "Clone URLs and where images come from: walt help show registries")]
    Search {
        /// Show only the images whose clone URL contains this.
        keyword: Option<String>,
        /// Print the results as one JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Push an image of your working set to a registry; prints its clone URL.
    #[command(after_help = "Registries and clone URLs: walt help show registries")]
    Publish {
        /// Label of the registry (default `auto`: the only one configured).
        #[arg(long, default_value = "auto")]
        registry: String,
        /// The image: <name> or <name>:<tag>.
        image: String,
    },
    /// Remove an image from your working set.
    Remove { image: String },
    /// Rename an image of your working set.
    Rename { image: String, new_name: String },
    /// Copy an image of your working set under a new name.
    Duplicate { image: String, new_name: String },
    /// Merge all layers of an image of your working set into one (asks
    /// first when nodes use it: they reboot).
    Squash {
        /// Do not ask when nodes use the image.
        #[arg(long)]
        yes: bool,
        image: String,
    },
    /// Open a shell inside an image; on exit, save the changes.
    #[command(after_help = "More: walt help show shells")]
    Shell { image: String },
    /// Copy files or directories between this machine and an image:
    /// `cp <local> <image>:<path>` or `cp <image>:<path> <local>`
    /// (relative image paths are relative to /root; copying into an image
    /// saves it; asks first when nodes use it: they reboot).
    #[command(after_help = "More: walt help show image-cp")]
    Cp {
        /// Do not ask when nodes use the image copied into.
        #[arg(long)]
        yes: bool,
        src: String,
        dst: String,
    },
    /// Build an image of your working set from a Dockerfile:
    /// `build --from-dir DIR <image>` or
    /// `build --from-url GIT_URL [--sub-dir PATH] <image>`.
    Build(build::BuildArgs),
}

type Client = ImagesClient<InterceptedService<Channel, UserInterceptor>>;

#[derive(Clone)]
pub struct UserInterceptor(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for UserInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut()
            .insert(walt_proto::USER_METADATA_KEY, self.0.clone());
        Ok(req)
    }
}

async fn connect(settings: &Settings) -> anyhow::Result<Client> {
    let (channel, user) = connect_channel(settings).await?;
    Ok(ImagesClient::with_interceptor(channel, user).max_decoding_message_size(64 << 20))
}

/// The connection to the server, and the interceptor naming the user; the
/// server's welcome (the default images it gave the user) is said first.
pub async fn connect_channel(settings: &Settings) -> anyhow::Result<(Channel, UserInterceptor)> {
    let channel = crate::tls::connect(settings).await?;
    let user = MetadataValue::try_from(settings.username.as_str())
        .map_err(|_| anyhow!("invalid walt username '{}'", settings.username))?;
    let user = UserInterceptor(user);
    crate::node::welcome(channel.clone(), user.clone()).await;
    Ok((channel, user))
}

/// A registry refused the call for lack of (valid) credentials.
#[derive(Debug)]
pub struct CredentialsNeeded {
    pub label: String,
    pub message: String,
}

impl std::fmt::Display for CredentialsNeeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CredentialsNeeded {}

/// The one line the user sees for a failed call.
pub(crate) fn status_error(s: Status) -> anyhow::Error {
    let msg = s.message();
    if s.code() == Code::Unauthenticated
        && let Some(label) = s
            .metadata()
            .get(walt_proto::REGISTRY_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
    {
        return CredentialsNeeded {
            label: label.to_string(),
            message: msg.to_string(),
        }
        .into();
    }
    // Statuses from the transport (not from walt-server) carry its wording.
    let transport = [
        "transport error",
        "h2 protocol error",
        "tcp connect error",
        "error reading a body from connection",
    ]
    .iter()
    .any(|t| msg.contains(t));
    match s.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
            if transport || msg.is_empty() =>
        {
            anyhow!(
                "lost the connection to the walt server ({})",
                if msg.is_empty() { "no detail" } else { msg }
            )
        }
        _ => anyhow!("{msg}"),
    }
}

pub async fn run(cmd: ImageCommand) -> anyhow::Result<()> {
    // What build can check alone is checked before anything else.
    if let ImageCommand::Build(args) = cmd {
        let prepared = build::prepare(args)?;
        let settings = config::load()?;
        let mut client = connect(&settings).await?;
        return build::build(&mut client, &settings, prepared).await;
    }
    // Refused before connecting, as WalT does.
    if let ImageCommand::Show {
        all: true,
        names_only: true,
        ..
    } = cmd
    {
        return Err(anyhow!(
            "options --names-only and --all are mutually exclusive"
        ));
    }
    let mut settings = config::load()?;
    let mut client = connect(&settings).await?;
    // Clone and publish may need registry credentials: when the registry
    // refuses, ask for them (on a terminal), retry once, and keep them if
    // they worked.
    if matches!(
        cmd,
        ImageCommand::Clone { .. } | ImageCommand::Publish { .. }
    ) {
        let first = run_one(&mut client, &settings, &cmd).await;
        let needed = match &first {
            Err(e) if prompt::interactive() => e.downcast_ref::<CredentialsNeeded>(),
            _ => None,
        };
        let Some(needed) = needed else {
            return first;
        };
        let label = needed.label.clone();
        eprintln!("{needed}");
        let creds = prompt::ask_credentials(&label)?;
        settings
            .config
            .registries
            .insert(label.clone(), creds.clone());
        let second = run_one(&mut client, &settings, &cmd).await;
        let refused = second
            .as_ref()
            .err()
            .and_then(|e| e.downcast_ref::<CredentialsNeeded>())
            .is_some_and(|n| n.label == label);
        if !refused {
            let path = config::save_credentials(&label, &creds)?;
            eprintln!(
                "Credentials for registry '{label}' saved in {}.",
                path.display()
            );
        }
        return second;
    }
    run_one(&mut client, &settings, &cmd).await
}

async fn run_one(
    client: &mut Client,
    settings: &Settings,
    cmd: &ImageCommand,
) -> anyhow::Result<()> {
    match cmd.clone() {
        ImageCommand::Show {
            all,
            names_only,
            refresh,
        } => show(client, settings, all, names_only, refresh).await,
        ImageCommand::Clone { force, url, name } => {
            clone(client, settings, &url, name, force).await
        }
        ImageCommand::Search { keyword, json } => {
            search::search(client, settings, keyword, json).await
        }
        ImageCommand::Publish { registry, image } => {
            publish::publish(client, settings, &image, &registry).await
        }
        ImageCommand::Remove { image } => {
            client
                .remove(pb::RemoveRequest {
                    image: image.clone(),
                })
                .await
                .map_err(status_error)?;
            println!("Image {image} removed.");
            Ok(())
        }
        ImageCommand::Rename { image, new_name } => {
            client
                .rename(pb::RenameRequest {
                    image: image.clone(),
                    new_name: new_name.clone(),
                })
                .await
                .map_err(status_error)?;
            println!("Image {image} renamed to {new_name}.");
            Ok(())
        }
        ImageCommand::Duplicate { image, new_name } => {
            client
                .duplicate(pb::DuplicateRequest {
                    image: image.clone(),
                    new_name: new_name.clone(),
                })
                .await
                .map_err(status_error)?;
            println!("Image {image} duplicated as {new_name}.");
            Ok(())
        }
        ImageCommand::Shell { image } => shell::shell(client, &image).await,
        ImageCommand::Cp { src, dst, yes } => cp::cp(client, settings, &src, &dst, yes).await,
        ImageCommand::Build(args) => build::build(client, settings, build::prepare(args)?).await,
        ImageCommand::Squash { image, yes } => {
            let mut req = pb::SquashRequest {
                image: image.clone(),
                confirmed: yes,
            };
            let reply = match client.squash(req.clone()).await {
                Err(s) if let Some(nodes) = cp::nodes_to_confirm(&s) => {
                    cp::confirm_reboot(nodes, &image, &format!("walt image squash --yes {image}"))?;
                    req.confirmed = true;
                    client.squash(req).await
                }
                r => r,
            }
            .map_err(status_error)?
            .into_inner();
            println!("{}", reply.message);
            Ok(())
        }
    }
}

fn short_name(i: &pb::ImageInfo) -> String {
    if i.tag == "latest" {
        i.name.clone()
    } else {
        format!("{}:{}", i.name, i.tag)
    }
}

/// WalT's texts around the `walt image show` tables.
const MSG_WS_IS_EMPTY: &str = "Your working set is empty.";
const MSG_RERUN_WITH_ALL: &str = "Re-run with --all to see all OS images on this platform.";
const MSG_TIP_CLONE: &str =
    "Use 'walt image clone <clonable_link>' to clone an image\ninto your working set.";
const MSG_TIP_SEARCH: &str =
    "Use 'walt image search [<keyword>]' to search for images\non remote registries.";
const TITLE_USER_IMAGES: &str = "Your working set is made of the following images:";
const TITLE_OTHER_IMAGES: &str = "Other users of this platform have created the following images:";
const TITLE_DEFAULT_IMAGES: &str = "The following are default OS images:";
const MSG_NO_IMAGES: &str = "No OS images found!";

/// A table under its title, as WalT's `format_paragraph` lays it out: an
/// empty line, the title (bold on a terminal), an empty line, the table,
/// an empty line.
fn paragraph(title: &str, table: &str, bold: bool) -> String {
    let (on, off) = if bold {
        ("\x1b[1m", "\x1b[0m")
    } else {
        ("", "")
    };
    format!("\n{on}{title}\n{off}\n{table}\n\n")
}

/// WalT's default images: owned by `waltplatform`, named `*-default`.
fn is_default_image(i: &pb::ImageInfo) -> bool {
    i.owner == walt_core::DEFAULT_IMAGES_OWNER && short_name(i).ends_with("-default")
}

/// The text of `walt image show` (without `--names-only`), as WalT prints it.
fn show_text(reply: &pb::ShowReply, username: &str, all: bool, bold: bool) -> String {
    let mut mine = Vec::new();
    let mut defaults = Vec::new();
    let mut others = Vec::new();
    for i in &reply.images {
        if i.owner == username {
            mine.push(i);
        } else if is_default_image(i) {
            defaults.push(i);
        } else {
            others.push(i);
        }
    }
    let created = |i: &pb::ImageInfo| {
        i.image_created
            .map(table::local_datetime)
            .unwrap_or_default()
    };
    let more = reply.others_exist || !others.is_empty() || !defaults.is_empty();
    let mut text = String::new();
    let mut footnotes: Vec<&str> = Vec::new();
    if !all && more {
        footnotes.push(MSG_RERUN_WITH_ALL);
    }
    if mine.is_empty() && !all {
        footnotes.insert(0, MSG_WS_IS_EMPTY);
    } else if mine.is_empty() && others.is_empty() && defaults.is_empty() {
        footnotes.insert(0, MSG_NO_IMAGES);
    } else {
        if !mine.is_empty() {
            let rows: Vec<_> = mine
                .iter()
                .map(|i| {
                    vec![
                        short_name(i),
                        if i.in_use { "True" } else { "False" }.to_string(),
                        created(i),
                        walt_core::autoglob(&i.node_models),
                    ]
                })
                .collect();
            let t = table::columnate(&["name", "in-use", "created", "compatibility"], &rows);
            text.push_str(&paragraph(TITLE_USER_IMAGES, &t, bold));
        }
        if all {
            if !others.is_empty() {
                let rows: Vec<_> = others
                    .iter()
                    .map(|i| {
                        vec![
                            i.owner.clone(),
                            short_name(i),
                            created(i),
                            i.clone_url.clone(),
                        ]
                    })
                    .collect();
                let t = table::columnate(&["user", "name", "created", "clonable-link"], &rows);
                text.push_str(&paragraph(TITLE_OTHER_IMAGES, &t, bold));
            }
            if !defaults.is_empty() {
                let rows: Vec<_> = defaults
                    .iter()
                    .map(|i| vec![short_name(i), created(i), i.clone_url.clone()])
                    .collect();
                let t = table::columnate(&["name", "created", "clonable-link"], &rows);
                text.push_str(&paragraph(TITLE_DEFAULT_IMAGES, &t, bold));
            }
            if !others.is_empty() || !defaults.is_empty() {
                footnotes.push(MSG_TIP_CLONE);
            }
            footnotes.push(MSG_TIP_SEARCH);
        }
    }
    text.push_str(&footnotes.join("\n"));
    text
}

async fn show(
    client: &mut Client,
    settings: &Settings,
    all: bool,
    names_only: bool,
    refresh: bool,
) -> anyhow::Result<()> {
    let reply = client
        .show(pb::ShowRequest { all, refresh })
        .await
        .map_err(status_error)?
        .into_inner();
    if refresh {
        for line in &reply.missing {
            eprintln!("warning: {}", walt_core::text::one_line(line));
        }
        if reply.missing.is_empty() {
            eprintln!("Store checked: the content of every image is present.");
        }
    }
    if names_only {
        for i in reply.images.iter().filter(|i| i.owner == settings.username) {
            println!("{}", walt_core::text::one_line(&short_name(i)));
        }
        return Ok(());
    }
    let bold = std::io::IsTerminal::is_terminal(&std::io::stdout());
    println!("{}", show_text(&reply, &settings.username, all, bold));
    Ok(())
}

fn human(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

async fn clone(
    client: &mut Client,
    settings: &Settings,
    url: &str,
    name: Option<String>,
    force: bool,
) -> anyhow::Result<()> {
    // Credentials for the registry, when the user has some.
    let credentials = CloneUrl::parse(url.trim())
        .ok()
        .and_then(|u| settings.config.registries.get(u.location.label()).cloned())
        .map(|c| pb::Credentials {
            username: c.username,
            password: c.password,
        });
    let mut stream = client
        .clone(pb::CloneRequest {
            url: url.to_string(),
            name: name.unwrap_or_default(),
            force,
            credentials,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut bars = Bars::new("already in store", "done");
    loop {
        let event = match stream.message().await {
            Ok(Some(ev)) => ev,
            Ok(None) => return Err(anyhow!("the server closed the clone without a result")),
            Err(s) => {
                bars.clear();
                return Err(status_error(s));
            }
        };
        match event.event {
            Some(Event::Message(text)) => bars.message(&text),
            Some(Event::Progress(p)) => bars.update(&p),
            Some(Event::Result(r)) => {
                bars.clear();
                let what = if r.downloaded_bytes > 0 {
                    format!(
                        " ({} layer{}, {} downloaded)",
                        r.layers,
                        if r.layers == 1 { "" } else { "s" },
                        human(r.downloaded_bytes)
                    )
                } else {
                    String::new()
                };
                let verb = if r.replaced {
                    "cloned (replacing the previous one)"
                } else {
                    "cloned"
                };
                println!("Image {} {verb} from {}{what}.", r.name, url.trim());
                return Ok(());
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod show_tests {
    use super::*;

    fn image(owner: &str, name: &str, models: &[&str]) -> pb::ImageInfo {
        pb::ImageInfo {
            owner: owner.into(),
            name: name.into(),
            tag: "latest".into(),
            node_models: models.iter().map(|m| m.to_string()).collect(),
            clone_url: format!("walt:{owner}/{name}"),
            ..Default::default()
        }
    }

    #[test]
    fn all_without_own_images_shows_the_other_sections_and_tips() {
        let reply = pb::ShowReply {
            images: vec![
                image("bob", "b", &["pc-x86-64"]),
                image("waltplatform", "rpi-default", &["rpi-4-b"]),
            ],
            ..Default::default()
        };
        // No config time: an empty (padded) cell, as WalT shows None.
        assert_eq!(
            show_text(&reply, "alice", true, false),
            "\nOther users of this platform have created the following images:\n\n\
             user  name  created  clonable-link\n\
             ----  ----  -------  -------------\n\
             bob   b              walt:bob/b   \n\n\n\
             The following are default OS images:\n\n\
             name         created  clonable-link                \n\
             -----------  -------  -----------------------------\n\
             rpi-default           walt:waltplatform/rpi-default\n\n\
             Use 'walt image clone <clonable_link>' to clone an image\n\
             into your working set.\n\
             Use 'walt image search [<keyword>]' to search for images\n\
             on remote registries."
        );
    }

    #[test]
    fn titles_are_bold_on_a_terminal_and_models_globbed() {
        let reply = pb::ShowReply {
            images: vec![image("alice", "a", &[])],
            others_exist: false,
            ..Default::default()
        };
        assert_eq!(
            show_text(&reply, "alice", false, true),
            "\n\x1b[1mYour working set is made of the following images:\n\x1b[0m\n\
             name  in-use  created  compatibility\n\
             ----  ------  -------  -------------\n\
             a     False            N/A          \n\n"
        );
    }
}
