//! `walt image ...`

use anyhow::anyhow;
use clap::Subcommand;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use walt_core::CloneUrl;
use walt_core::compact_models;
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
    },
    /// Copy an image into your working set.
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
    Search {
        /// Show only the images whose clone URL contains this.
        keyword: Option<String>,
        /// Print the results as one JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Push an image of your working set to a registry; prints its clone URL.
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
    Shell { image: String },
    /// Copy files or directories between this machine and an image:
    /// `cp <local> <image>:<path>` or `cp <image>:<path> <local>`
    /// (relative image paths are relative to /root; copying into an image
    /// saves it; asks first when nodes use it: they reboot).
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
        ImageCommand::Show { all, names_only } => show(client, settings, all, names_only).await,
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
        ImageCommand::Cp { src, dst, yes } => cp::cp(client, &src, &dst, yes).await,
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

async fn show(
    client: &mut Client,
    settings: &Settings,
    all: bool,
    names_only: bool,
) -> anyhow::Result<()> {
    let reply = client
        .show(pb::ShowRequest { all })
        .await
        .map_err(status_error)?
        .into_inner();
    let (mine, others): (Vec<_>, Vec<_>) = reply
        .images
        .into_iter()
        .partition(|i| i.owner == settings.username);
    if names_only {
        for i in &mine {
            println!("{}", short_name(i));
        }
        return Ok(());
    }
    let row = |i: &pb::ImageInfo| {
        vec![
            short_name(i),
            if i.in_use { "True" } else { "False" }.to_string(),
            table::datetime(i.created),
            compact_models(&i.node_models),
        ]
    };
    if mine.is_empty() {
        println!(
            "You have no images yet: find some with walt image search, then walt image clone <url>."
        );
    } else {
        let rows: Vec<_> = mine.iter().map(row).collect();
        print!(
            "{}",
            table::render(&["NAME", "IN-USE", "CREATED", "COMPATIBILITY"], &rows)
        );
    }
    if all && !others.is_empty() {
        let rows: Vec<_> = others
            .iter()
            .map(|i| {
                let mut r = vec![i.owner.clone()];
                r.extend(row(i));
                r.push(i.clone_url.clone());
                r
            })
            .collect();
        println!();
        println!("Images of other users:");
        print!(
            "{}",
            table::render(
                &[
                    "OWNER",
                    "NAME",
                    "IN-USE",
                    "CREATED",
                    "COMPATIBILITY",
                    "CLONE URL"
                ],
                &rows
            )
        );
    }
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
