//! `walt image cp`: files and directories between this machine and an
//! image, streamed as tar. The archive always holds one top entry (the
//! source's name); the receiving side applies the `cp -r` destination rules.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, anyhow, bail};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use walt_proto::v1::{self as pb, copy_in_request::Msg};
use walt_tar::{
    Devices, ExtractOptions, Extractor, Owners, PlainWriter, Reader, TreeOptions, TreeOwners,
    TreeWhiteouts, Whiteouts,
};

use super::{Client, status_error};
use crate::chunks::ChunkWriter;
use crate::config::Settings;

const CHUNK: usize = 256 * 1024;

/// What the tar producer says when the server no longer reads the stream.
const SERVER_STOPPED: &str = "the server stopped the copy";

/// Which side of the copy the image is on.
#[derive(Debug, PartialEq, Eq)]
pub enum Direction {
    /// `walt image cp <local> <image>:<path>`
    In {
        local: String,
        image: String,
        path: String,
    },
    /// `walt image cp <image>:<path> <local>`
    Out {
        image: String,
        path: String,
        local: String,
    },
}

/// `<image>:<path>`, split on the last `:`.
fn image_operand(s: &str) -> Option<(String, String)> {
    let (image, path) = s.rsplit_once(':')?;
    if image.is_empty() || image.contains('/') {
        return None;
    }
    Some((image.to_string(), path.to_string()))
}

pub fn direction(src: &str, dst: &str) -> anyhow::Result<Direction> {
    match (image_operand(src), image_operand(dst)) {
        (Some((image, path)), None) => Ok(Direction::Out {
            image,
            path,
            local: dst.to_string(),
        }),
        (None, Some((image, path))) => Ok(Direction::In {
            local: src.to_string(),
            image,
            path,
        }),
        (Some((image, path)), Some(_)) if !Path::new(src).exists() => Ok(Direction::Out {
            image,
            path,
            local: dst.to_string(),
        }),
        (Some(_), Some((image, path))) => Ok(Direction::In {
            local: src.to_string(),
            image,
            path,
        }),
        (None, None) => bail!(
            "one operand must name a path in an image, as <image>:<path> (e.g. walt image cp ./file myimage:/root/)"
        ),
    }
}

pub async fn cp(
    client: &mut Client,
    settings: &Settings,
    src: &str,
    dst: &str,
    yes: bool,
) -> anyhow::Result<()> {
    let local_server = server_is_local(&settings.server);
    match direction(src, dst)? {
        Direction::In { local, image, path } => {
            match copy_in(client, local_server, &local, &image, &path, yes).await {
                Err(e) if let Some(&NeedsConfirm(n)) = e.downcast_ref::<NeedsConfirm>() => {
                    let hint = format!("walt image cp --yes {src} {dst}");
                    confirm_reboot(n, &image, &hint)?;
                    copy_in(client, local_server, &local, &image, &path, true).await
                }
                r => r,
            }
        }
        Direction::Out { image, path, local } => {
            copy_out(client, local_server, &image, &path, &local).await
        }
    }
}

/// Whether the server runs on this machine (`walt.server` names one of
/// its addresses), so that the archive can go through a FIFO instead of
/// the API stream. `WALT_CP_STREAM=1` always uses the stream.
fn server_is_local(server: &str) -> bool {
    if std::env::var_os("WALT_CP_STREAM").is_some_and(|v| !v.is_empty() && v != "0") {
        return false;
    }
    let Ok(endpoint) = crate::config::endpoint(server) else {
        return false;
    };
    let Some(authority) = endpoint.strip_prefix("http://") else {
        return false;
    };
    use std::net::ToSocketAddrs;
    let Ok(addrs) = authority.to_socket_addrs() else {
        return false;
    };
    // An address of this machine is one a socket can be bound to.
    addrs
        .into_iter()
        .any(|a| a.ip().is_loopback() || std::net::UdpSocket::bind((a.ip(), 0)).is_ok())
}

/// A FIFO in a private directory (removed with it), which the server
/// opens when it runs on this machine: the archive then goes between this
/// process and the server's copy process directly.
struct LocalPipe {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl LocalPipe {
    fn new() -> Option<LocalPipe> {
        // $XDG_RUNTIME_DIR rather than /tmp, which a server may not share
        // (systemd's PrivateTmp).
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix("walt-cp-")
            .tempdir_in(base)
            .ok()?;
        let path = dir.path().join("archive");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).ok()?;
        Some(LocalPipe { _dir: dir, path })
    }

    fn name(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// Opens it, with a 1 MiB buffer; `O_RDWR` never waits for the other
    /// end (`O_RDONLY` does, unless non-blocking).
    fn open(&self, flags: rustix::fs::OFlags) -> io::Result<fs::File> {
        let fd = rustix::fs::open(
            &self.path,
            flags | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        let _ = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
        Ok(fs::File::from(fd))
    }
}

/// The server could not use our FIFO (it runs elsewhere, or in another
/// mount namespace): the copy goes through the stream instead.
fn pipe_refused(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::FailedPrecondition
        && s.metadata()
            .get(walt_proto::LOCAL_PIPE_METADATA_KEY)
            .is_some()
}

/// The server refused to modify an image nodes use until the user
/// confirms: that many nodes would reboot.
#[derive(Debug)]
struct NeedsConfirm(usize);

impl std::fmt::Display for NeedsConfirm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the image is used by {} node(s)", self.0)
    }
}

impl std::error::Error for NeedsConfirm {}

/// For a refusal the user may confirm (squash, cp into an image nodes
/// use): the number of nodes that would reboot.
pub fn nodes_to_confirm(s: &tonic::Status) -> Option<usize> {
    if s.code() != tonic::Code::FailedPrecondition {
        return None;
    }
    s.metadata()
        .get(walt_proto::CONFIRM_METADATA_KEY)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// WalT's question before modifying an image `nodes` nodes use (they
/// reboot): `Are you sure? (y/n)`, read from stdin as WalT does, so that a
/// script can answer it (`echo y | walt image squash img`). `n` aborts
/// (exit status 1); without an answer (end of input) nothing is done and
/// the error gives `hint`, the command with `--yes`.
pub fn confirm_reboot(nodes: usize, image: &str, hint: &str) -> anyhow::Result<()> {
    eprintln!("This operation would reboot {nodes} node(s) currently using the image.");
    loop {
        let Ok(answer) = crate::prompt::ask_line("Are you sure? (y/n): ") else {
            if !crate::prompt::interactive() {
                eprintln!();
            }
            bail!(
                "image '{image}' is used by {nodes} node(s): nothing changed, no answer given (use {hint} to confirm)"
            );
        };
        match answer.trim() {
            "y" => return Ok(()),
            "n" => {
                eprintln!("Aborted.");
                return Err(super::shell::ExitWith(1).into());
            }
            _ => eprintln!("Invalid response."),
        }
    }
}

/// A `tar` message.
fn tar_msg(chunk: Vec<u8>) -> pb::CopyInRequest {
    pb::CopyInRequest {
        msg: Some(Msg::Tar(chunk.into())),
    }
}

/// The name of the top entry for a source path: its own last component
/// (a symlink keeps its name, as with `cp`), resolved only for `.`, `..`
/// and `/`.
fn top_name(path: &Path) -> anyhow::Result<String> {
    if let Some(Component::Normal(n)) = path.components().next_back() {
        return Ok(n.to_string_lossy().into_owned());
    }
    let resolved =
        fs::canonicalize(path).with_context(|| format!("{}: cannot resolve", path.display()))?;
    Ok(resolved
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "rootfs".to_string()))
}

async fn copy_in(
    client: &mut Client,
    local_server: bool,
    local: &str,
    image: &str,
    path: &str,
    confirmed: bool,
) -> anyhow::Result<()> {
    let src = PathBuf::from(local);
    fs::metadata(&src).map_err(|e| anyhow!("{local}: {}", io_reason(&e)))?;
    let top = top_name(&src)?;
    let start = pb::CopyInStart {
        image: image.to_string(),
        dest: path.to_string(),
        confirmed,
        local_pipe: String::new(),
    };
    if local_server && let Some(pipe) = LocalPipe::new() {
        match copy_in_local(client, &src, &top, start.clone(), &pipe).await {
            Err(e) if e.is::<PipeRefused>() => {}
            r => return r,
        }
    }
    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::CopyInRequest {
        msg: Some(Msg::Start(start)),
    })
    .await
    .map_err(|_| anyhow!("cannot start the copy"))?;
    let writer = ChunkWriter::new(tx, CHUNK, tar_msg, SERVER_STOPPED);
    let producer = std::thread::spawn(move || -> anyhow::Result<()> {
        let writer = write_archive(writer, &src, top)?;
        // Only a complete archive is saved by the server.
        writer
            .tx
            .blocking_send(END)
            .map_err(|_| anyhow!(SERVER_STOPPED))?;
        Ok(())
    });
    let call = client.copy_in(ReceiverStream::new(rx)).await;
    let produced = join(move || producer.join()).await?;
    settle_in(call, produced)
}

/// Waits, off the async threads, for a copy thread joined by `wait`.
async fn join<T: Send + 'static>(
    wait: impl FnOnce() -> std::thread::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(wait)
        .await
        .map_err(|e| anyhow!("copy task failed: {e}"))?
        .map_err(|_| anyhow!("copy task panicked"))
}

/// The message that closes a complete archive.
const END: pb::CopyInRequest = pb::CopyInRequest {
    msg: Some(Msg::End(true)),
};

/// The server cannot use the FIFO we offered: the copy goes through the
/// stream instead.
#[derive(Debug)]
struct PipeRefused;

impl std::fmt::Display for PipeRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the server cannot use this copy's pipe")
    }
}

impl std::error::Error for PipeRefused {}

/// The copy into an image through a FIFO (the server runs here): the
/// archive goes straight to the server's copy process; the stream carries
/// the start and the end.
async fn copy_in_local(
    client: &mut Client,
    src: &Path,
    top: &str,
    mut start: pb::CopyInStart,
    pipe: &LocalPipe,
) -> anyhow::Result<()> {
    start.local_pipe = pipe.name();
    // Read-write: opening never waits for the server, which may refuse it.
    let fifo = pipe.open(rustix::fs::OFlags::RDWR)?;
    // Held until the server replied: a FIFO nobody has open loses what it
    // holds, and a small archive may be all written before the server
    // opened its end. (The server's copy process stops at the archive's
    // end marker; it does not wait for the end of the FIFO.)
    let keep = fifo.try_clone()?;
    let abandon = Arc::new(AtomicBool::new(false));
    let writer = FifoWriter {
        file: fifo,
        abandon: abandon.clone(),
    };
    let (tx, rx) = mpsc::channel(2);
    tx.send(pb::CopyInRequest {
        msg: Some(Msg::Start(start)),
    })
    .await
    .map_err(|_| anyhow!("cannot start the copy"))?;
    let (src, top) = (src.to_path_buf(), top.to_string());
    let producer = std::thread::spawn(move || -> anyhow::Result<()> {
        let writer = write_archive(io::BufWriter::with_capacity(CHUNK, writer), &src, top)?;
        drop(writer);
        tx.blocking_send(END).map_err(|_| anyhow!(SERVER_STOPPED))?;
        Ok(())
    });
    let call = client.copy_in(ReceiverStream::new(rx)).await;
    drop(keep);
    if call.is_err() {
        // Nobody reads the FIFO any more (or ever did): the producer may
        // wait on a full pipe. It stops at its next write; what it is
        // writing is read away until it closed its end.
        abandon.store(true, Ordering::SeqCst);
        let drain = pipe.open(rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NONBLOCK);
        tokio::task::spawn_blocking(move || {
            if let Ok(mut f) = drain
                && rustix::fs::fcntl_setfl(&f, rustix::fs::OFlags::empty()).is_ok()
            {
                let _ = io::copy(&mut f, &mut io::sink());
            }
        })
        .await
        .map_err(|e| anyhow!("copy task failed: {e}"))?;
    }
    let produced = join(move || producer.join()).await?;
    if let Err(s) = &call
        && pipe_refused(s)
    {
        return Err(PipeRefused.into());
    }
    settle_in(call, produced)
}

/// Our end of the FIFO of a copy into an image: once the copy is
/// abandoned, every write fails.
struct FifoWriter {
    file: fs::File,
    abandon: Arc<AtomicBool>,
}

impl Write for FifoWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.abandon.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, SERVER_STOPPED));
        }
        self.file.write(data)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes the archive of `src` (one top entry, `top`) into `writer`.
fn write_archive<W: Write>(writer: W, src: &Path, top: String) -> anyhow::Result<W> {
    let resolved = fs::canonicalize(src)?;
    let opts = TreeOptions {
        whiteouts: TreeWhiteouts::Keep,
        top: Some(top.into()),
        follow_top: true,
        owners: tree_owners(),
        xattrs: false,
        sparse: true,
    };
    let (mut writer, stats) = walt_tar::write_tree(writer, &resolved, &opts)?;
    for s in &stats.skipped_sockets {
        let below = s.split_once('/').map(|(_, r)| r).unwrap_or("");
        eprintln!(
            "warning: {}: socket skipped",
            resolved.join(below).display()
        );
    }
    writer.flush()?;
    Ok(writer)
}

/// The outcome of a copy into an image, from the server's reply and our
/// producer's.
fn settle_in(
    call: Result<tonic::Response<pb::CopyInReply>, tonic::Status>,
    produced: anyhow::Result<()>,
) -> anyhow::Result<()> {
    // A local failure (an unreadable file...) explains the server's
    // "interrupted"; otherwise the server's reason comes first: it may have
    // stopped reading (and then our side only saw a closed stream).
    if let Err(s) = &call
        && let Some(n) = nodes_to_confirm(s)
    {
        return Err(NeedsConfirm(n).into());
    }
    let reply = match (call, produced) {
        (Ok(reply), Ok(())) => reply.into_inner(),
        (Err(s), Ok(())) => return Err(status_error(s)),
        // The producer's error may wrap the closed stream in context
        // ("<file>: cannot read"): look through the whole chain.
        (Err(s), Err(e)) if e.chain().any(|c| c.to_string().contains(SERVER_STOPPED)) => {
            return Err(status_error(s));
        }
        (_, Err(e)) => return Err(e),
    };
    if !reply.message.is_empty() {
        eprintln!("{}", reply.message);
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "No such file or directory".to_string(),
        io::ErrorKind::PermissionDenied => "Permission denied".to_string(),
        _ => e.to_string(),
    }
}

/// Owners in the archive: kept when run by root, else root's (like
/// `podman cp`: the image's files belong to its users, not ours).
fn tree_owners() -> TreeOwners {
    if is_root() {
        TreeOwners::Keep
    } else {
        TreeOwners::Fixed {
            uid: 0,
            gid: 0,
            uname: "root".into(),
            gname: "root".into(),
        }
    }
}

/// Reads the chunks received from the server as one stream; a server error
/// becomes a read error (the extraction stops, nothing is taken as complete).
struct ChunkReader {
    rx: std::sync::mpsc::Receiver<Result<bytes::Bytes, String>>,
    cur: bytes::Bytes,
    pos: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(Ok(c)) => {
                    self.cur = c;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(io::Error::other(e)),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

async fn copy_out(
    client: &mut Client,
    local_server: bool,
    image: &str,
    path: &str,
    local: &str,
) -> anyhow::Result<()> {
    let mut req = pb::CopyOutRequest {
        image: image.to_string(),
        path: path.to_string(),
        local_pipe: String::new(),
    };
    if local_server && let Some(pipe) = LocalPipe::new() {
        req.local_pipe = pipe.name();
        // Non-blocking: opening the reading end does not wait for the
        // server; what is read is read once the server said it writes.
        let fifo = pipe.open(rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NONBLOCK)?;
        match client.copy_out(req.clone()).await {
            Ok(r) => return receive(r.into_inner(), Some(fifo), local).await,
            Err(s) if pipe_refused(&s) => req.local_pipe.clear(),
            Err(s) => return Err(status_error(s)),
        }
    }
    let stream = client
        .copy_out(req)
        .await
        .map_err(status_error)?
        .into_inner();
    receive(stream, None, local).await
}

/// Extracts the archive the server sends, in the stream or, when it
/// starts with a `local` message, through `fifo`; the stream then only
/// ends or fails.
async fn receive(
    mut stream: tonic::Streaming<pb::CopyOutChunk>,
    fifo: Option<fs::File>,
    local: &str,
) -> anyhow::Result<()> {
    let dest = PathBuf::from(local);
    let (tx, rx) = std::sync::mpsc::sync_channel(16);
    let first = stream.message().await;
    let (extractor, mut next) = match (first, fifo) {
        (Ok(Some(c)), Some(fifo)) if c.local => {
            rustix::fs::fcntl_setfl(&fifo, rustix::fs::OFlags::empty())?;
            let x = std::thread::spawn(move || {
                extract(io::BufReader::with_capacity(CHUNK, fifo), &dest)
            });
            (x, stream.message().await)
        }
        (first, _) => {
            let x = std::thread::spawn(move || {
                extract(
                    ChunkReader {
                        rx,
                        cur: bytes::Bytes::new(),
                        pos: 0,
                    },
                    &dest,
                )
            });
            (x, first)
        }
    };
    // In the stream: the chunks for the extractor (none after a `local`
    // message: that stream just ends, or fails).
    let mut server_error = None;
    loop {
        match next {
            Ok(Some(c)) => {
                if !c.tar.is_empty() && tx.send(Ok(c.tar)).is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(s) => {
                let _ = tx.send(Err(s.message().to_string()));
                server_error = Some(s);
                break;
            }
        }
        next = stream.message().await;
    }
    drop(tx);
    let result = join(move || extractor.join()).await?;
    match (result, server_error) {
        (Ok(()), None) => Ok(()),
        // A broken or short archive: the server says why.
        (Err(e), Some(s)) if e.is::<ArchiveCut>() => Err(status_error(s)),
        (Ok(()), Some(s)) => Err(status_error(s)),
        (Err(e), _) => Err(e),
    }
}

/// The archive from the server was empty, short or broken: when the
/// server failed, its reason is the one to give.
#[derive(Debug)]
struct ArchiveCut(String);

impl std::fmt::Display for ArchiveCut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ArchiveCut {}

/// Extracts the archive (one top entry) to `dest` with the `cp -r` rules,
/// confined to where the top entry lands. Run by root, owners and xattrs
/// are restored; otherwise files belong to the user. Device nodes are never
/// created (skipped with a warning).
fn extract(reader: impl Read, dest: &Path) -> anyhow::Result<()> {
    let root = is_root();
    let shown = dest.display().to_string();
    let dest = dest.to_path_buf();
    let opts = ExtractOptions {
        whiteouts: Whiteouts::Keep,
        owners: if root { Owners::Keep } else { Owners::Ignore },
        // Never, even for root: an image's device nodes are the image's.
        devices: Devices::Skip,
        xattrs: root,
        cp_top: Some(Box::new(move |top, is_dir| {
            walt_tar::cp_landing(&shown, &dest, top, is_dir)
        })),
        limit: None,
        skip_unknown: true,
        area: "destination",
        replace_dirs: false,
    };
    let mut writer = PlainWriter;
    let mut reader = Reader::new(reader);
    let stats = Extractor::new(None, opts, &mut writer)
        .and_then(|x| x.extract(&mut reader))
        .map_err(|e| match e {
            walt_tar::Error::Empty => ArchiveCut("the server sent an empty archive".into()).into(),
            e @ walt_tar::Error::Entry { .. } => anyhow!("refusing archive {e}"),
            e @ (walt_tar::Error::Read(_) | walt_tar::Error::Format { .. }) => {
                ArchiveCut(format!("cannot read the archive: {e}")).into()
            }
            e => anyhow!(e),
        })?;
    if stats.skipped_devices > 0 {
        eprintln!(
            "warning: {} device node(s) not copied (walt image cp never creates device nodes)",
            stats.skipped_devices
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operands() {
        assert_eq!(
            direction("f", "img:/root/").unwrap(),
            Direction::In {
                local: "f".into(),
                image: "img".into(),
                path: "/root/".into()
            }
        );
        assert_eq!(
            direction("img:v2:x", "./out").unwrap(),
            Direction::Out {
                image: "img:v2".into(),
                path: "x".into(),
                local: "./out".into()
            }
        );
        assert!(direction("a", "b").is_err());
    }

    enum E<'a> {
        Dir(&'a str),
        File(&'a str),
        Link(&'a str, &'a Path),
        Hard(&'a str, &'a str),
    }

    fn archive(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o755);
            h.set_size(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_600_000_000);
            match e {
                E::Dir(p) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    b.append_data(&mut h, p, io::empty()).unwrap();
                }
                E::File(p) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(4);
                    b.append_data(&mut h, p, &b"evil"[..]).unwrap();
                }
                E::Link(p, t) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    b.append_link(&mut h, p, t).unwrap();
                }
                E::Hard(p, t) => {
                    h.set_entry_type(tar::EntryType::Link);
                    b.append_link(&mut h, p, t).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn extraction_never_writes_through_links() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), "s").unwrap();
        let o = outside.path();
        let cases: Vec<Vec<E>> = vec![
            // A symlink as the top entry, then something below it.
            vec![E::Link("t", o), E::File("t/x")],
            // A symlink inside, then something below it.
            vec![E::Dir("t"), E::Link("t/l", o), E::File("t/l/x")],
            // A hard link to a file reached through a symlink.
            vec![E::Dir("t"), E::Link("t/l", o), E::Hard("t/h", "t/l/secret")],
        ];
        for (i, c) in cases.iter().enumerate() {
            let dest = tempfile::tempdir().unwrap();
            let r = extract(&archive(c)[..], dest.path());
            assert!(r.is_err(), "case {i} accepted");
            assert!(!o.join("x").exists(), "case {i} wrote outside");
            assert!(!dest.path().join("t/h").exists(), "case {i} linked outside");
        }
        // A plain tree is accepted.
        let dest = tempfile::tempdir().unwrap();
        extract(
            &archive(&[E::Dir("t"), E::File("t/f"), E::Hard("t/g", "t/f")])[..],
            dest.path(),
        )
        .unwrap();
        assert_eq!(fs::read(dest.path().join("t/g")).unwrap(), b"evil");
    }

    #[test]
    fn hostile_archives_are_refused() {
        // walt-tar's table, through this extractor (`cp -r` rule).
        let policy = walt_tar::testing::Policy {
            overlay_whiteouts: false,
            devices_refused: false,
            limit: None,
        };
        walt_tar::testing::run_hostile_table(policy, |_case, tar| {
            let dest = tempfile::tempdir().unwrap().keep();
            extract(tar, &dest)
                .map(|()| dest.clone())
                .map_err(|e| format!("{e:#}"))
        });
    }
}
