//! `walt image cp`: files and directories between this machine and an
//! image, streamed as tar. The archive always holds one top entry (the
//! source's name); the receiving side applies the `cp -r` destination rules.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use walt_proto::v1::{self as pb, copy_in_request::Msg};

use super::{Client, status_error};

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

pub async fn cp(client: &mut Client, src: &str, dst: &str) -> anyhow::Result<()> {
    match direction(src, dst)? {
        Direction::In { local, image, path } => copy_in(client, &local, &image, &path).await,
        Direction::Out { image, path, local } => copy_out(client, &image, &path, &local).await,
    }
}

/// Writes the tar stream as chunks on a channel.
struct ChunkWriter {
    tx: mpsc::Sender<pb::CopyInRequest>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(pb::CopyInRequest {
                msg: Some(Msg::Tar(chunk)),
            })
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, SERVER_STOPPED))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        Ok(())
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

async fn copy_in(client: &mut Client, local: &str, image: &str, path: &str) -> anyhow::Result<()> {
    let src = PathBuf::from(local);
    let meta = fs::metadata(&src).map_err(|e| anyhow!("{local}: {}", io_reason(&e)))?;
    let top = top_name(&src)?;
    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::CopyInRequest {
        msg: Some(Msg::Start(pb::CopyInStart {
            image: image.to_string(),
            dest: path.to_string(),
        })),
    })
    .await
    .map_err(|_| anyhow!("cannot start the copy"))?;
    let writer = ChunkWriter {
        tx,
        buf: Vec::with_capacity(CHUNK),
    };
    let producer = std::thread::spawn(move || -> anyhow::Result<()> {
        let resolved = fs::canonicalize(&src)?;
        let mut b = tar::Builder::new(writer);
        let mut w = Walker {
            links: HashMap::new(),
            keep_owner: is_root(),
        };
        w.add(&mut b, &resolved, Path::new(&top), &meta)?;
        let mut writer = b.into_inner()?;
        writer.flush()?;
        // Only a complete archive is saved by the server.
        writer
            .tx
            .blocking_send(pb::CopyInRequest {
                msg: Some(Msg::End(true)),
            })
            .map_err(|_| anyhow!(SERVER_STOPPED))?;
        Ok(())
    });
    let call = client.copy_in(ReceiverStream::new(rx)).await;
    let produced = tokio::task::spawn_blocking(move || producer.join())
        .await
        .map_err(|e| anyhow!("copy task failed: {e}"))?
        .map_err(|_| anyhow!("copy task panicked"))?;
    // A local failure (an unreadable file...) explains the server's
    // "interrupted"; otherwise the server's reason comes first: it may have
    // stopped reading (and then our side only saw a closed stream).
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

/// Walks a local tree into a tar stream: modes, mtimes, symlinks, hard
/// links, devices and fifos; owners kept when run by root, else root's
/// (like `podman cp`: the image's files belong to its users, not ours).
struct Walker {
    links: HashMap<(u64, u64), PathBuf>,
    keep_owner: bool,
}

impl Walker {
    fn header(&self, meta: &fs::Metadata) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
        if !self.keep_owner {
            h.set_uid(0);
            h.set_gid(0);
            let _ = h.set_username("root");
            let _ = h.set_groupname("root");
        }
        h
    }

    fn add<W: Write>(
        &mut self,
        b: &mut tar::Builder<W>,
        path: &Path,
        name: &Path,
        meta: &fs::Metadata,
    ) -> anyhow::Result<()> {
        let ft = meta.file_type();
        let mut h = self.header(meta);
        let ctx = || format!("{}: cannot read", path.display());
        if ft.is_dir() {
            h.set_size(0);
            b.append_data(&mut h, name, io::empty()).with_context(ctx)?;
            let mut entries: Vec<_> = fs::read_dir(path)
                .with_context(ctx)?
                .collect::<io::Result<Vec<_>>>()
                .with_context(ctx)?;
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let p = e.path();
                let m = fs::symlink_metadata(&p)
                    .with_context(|| format!("{}: cannot read", p.display()))?;
                self.add(b, &p, &name.join(e.file_name()), &m)?;
            }
        } else if ft.is_symlink() {
            let target = fs::read_link(path).with_context(ctx)?;
            h.set_size(0);
            b.append_link(&mut h, name, &target).with_context(ctx)?;
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                if let Some(first) = self.links.get(&key) {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, name, first).with_context(ctx)?;
                    return Ok(());
                }
                self.links.insert(key, name.to_path_buf());
            }
            let f = fs::File::open(path).with_context(ctx)?;
            // Exactly the size in the header, even if the file changes
            // meanwhile (a longer or shorter body would corrupt the stream).
            let len = meta.len();
            let body = f.take(len).chain(io::repeat(0)).take(len);
            b.append_data(&mut h, name, body).with_context(ctx)?;
        } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
            h.set_size(0);
            b.append_data(&mut h, name, io::empty()).with_context(ctx)?;
        } else {
            eprintln!("warning: {}: socket skipped", path.display());
        }
        Ok(())
    }
}

/// Reads the chunks received from the server as one stream; a server error
/// becomes a read error (the extraction stops, nothing is taken as complete).
struct ChunkReader {
    rx: std::sync::mpsc::Receiver<Result<Vec<u8>, String>>,
    cur: Vec<u8>,
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

async fn copy_out(client: &mut Client, image: &str, path: &str, local: &str) -> anyhow::Result<()> {
    let mut stream = client
        .copy_out(pb::CopyOutRequest {
            image: image.to_string(),
            path: path.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let (tx, rx) = std::sync::mpsc::sync_channel(16);
    let dest = PathBuf::from(local);
    let extractor = std::thread::spawn(move || {
        extract(
            ChunkReader {
                rx,
                cur: Vec::new(),
                pos: 0,
            },
            &dest,
        )
    });
    let mut server_error = None;
    loop {
        match stream.message().await {
            Ok(Some(c)) => {
                if tx.send(Ok(c.tar)).is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(s) => {
                let _ = tx.send(Err(s.message().to_string()));
                server_error = Some(status_error(s));
                break;
            }
        }
    }
    drop(tx);
    let result = tokio::task::spawn_blocking(move || extractor.join())
        .await
        .map_err(|e| anyhow!("copy task failed: {e}"))?
        .map_err(|_| anyhow!("copy task panicked"))?;
    if let Some(e) = server_error {
        return Err(e);
    }
    result
}

/// The path components of an archive entry, refusing anything that could
/// leave the destination.
fn entry_parts(path: &Path) -> anyhow::Result<Vec<&std::ffi::OsStr>> {
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => parts.push(p),
            Component::CurDir => {}
            _ => bail!("refusing archive entry '{}'", path.display()),
        }
    }
    if parts.is_empty() {
        bail!("refusing an empty archive entry name");
    }
    Ok(parts)
}

/// Where the top entry lands: inside `dest` when it is a directory, else at
/// `dest` itself (its parent must exist).
fn landing(dest: &Path, top: &std::ffi::OsStr) -> anyhow::Result<PathBuf> {
    if dest.is_dir() {
        return Ok(dest.join(top));
    }
    let shown = dest.display();
    if dest.as_os_str().to_string_lossy().ends_with('/') {
        bail!("{shown}: not a directory");
    }
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        bail!("{shown}: No such file or directory");
    }
    Ok(dest.to_path_buf())
}

/// Whether a directory on the way from `base` to `base/parts` (the last
/// part excluded) is a symlink.
fn through_symlink(base: &Path, parts: &[&std::ffi::OsStr]) -> bool {
    let mut cur = base.to_path_buf();
    for p in parts.iter().take(parts.len().saturating_sub(1)) {
        cur.push(p);
        if fs::symlink_metadata(&cur).is_ok_and(|m| m.file_type().is_symlink()) {
            return true;
        }
    }
    false
}

/// Extracts the archive (one top entry) to `dest` with the `cp -r` rules.
fn extract(reader: impl Read, dest: &Path) -> anyhow::Result<()> {
    let mut archive = tar::Archive::new(reader);
    let root = is_root();
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(root);
    archive.set_unpack_xattrs(root);
    let mut target: Option<(std::ffi::OsString, PathBuf)> = None;
    let mut top_is_dir = false;
    let mut dirs: Vec<(PathBuf, tar::Header)> = Vec::new();
    let mut skipped_devices = 0usize;
    for entry in archive.entries().context("cannot read the archive")? {
        let mut entry = entry.context("cannot read the archive")?;
        let name = entry.path().context("bad archive entry name")?.into_owned();
        let parts = entry_parts(&name)?;
        let kind = entry.header().entry_type();
        let (top, base) = match &target {
            Some(t) => t.clone(),
            None => {
                let top = parts[0].to_os_string();
                let base = landing(dest, &top)?;
                if let Ok(m) = fs::symlink_metadata(&base) {
                    if kind.is_dir() && !m.is_dir() {
                        bail!(
                            "cannot overwrite non-directory '{}' with a directory",
                            base.display()
                        );
                    }
                    if !kind.is_dir() && m.is_dir() {
                        bail!(
                            "cannot overwrite directory '{}' with a non-directory",
                            base.display()
                        );
                    }
                }
                top_is_dir = kind.is_dir() || parts.len() > 1;
                target = Some((top.clone(), base.clone()));
                (top, base)
            }
        };
        if parts[0] != top {
            bail!(
                "refusing archive entry '{}' (outside '{}')",
                name.display(),
                top.to_string_lossy()
            );
        }
        let rel: PathBuf = parts[1..].iter().collect();
        // (`join("")` would add a trailing slash.)
        let out = if rel.as_os_str().is_empty() {
            base.clone()
        } else {
            base.join(&rel)
        };
        // Only a directory has entries below it; never write through a
        // symlink the archive created.
        if parts.len() > 1 && !top_is_dir {
            bail!(
                "refusing archive entry '{}': its top entry is not a directory",
                name.display()
            );
        }
        if through_symlink(&base, &parts[1..]) {
            bail!(
                "refusing archive entry '{}': it goes through a symlink",
                name.display()
            );
        }
        match kind {
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .context("bad hard link")?
                    .ok_or_else(|| anyhow!("hard link without a target"))?
                    .into_owned();
                let lp = entry_parts(&link)?;
                if lp[0] != top || through_symlink(&base, &lp[1..]) {
                    bail!(
                        "refusing hard link '{}' to '{}'",
                        name.display(),
                        link.display()
                    );
                }
                let rest: PathBuf = lp[1..].iter().collect();
                let src = if rest.as_os_str().is_empty() {
                    base.clone()
                } else {
                    base.join(rest)
                };
                let _ = fs::remove_file(&out);
                fs::hard_link(&src, &out)
                    .with_context(|| format!("{}: cannot create hard link", out.display()))?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo
                if !root && kind != tar::EntryType::Fifo =>
            {
                skipped_devices += 1;
            }
            _ => {
                if kind.is_dir() {
                    dirs.push((out.clone(), entry.header().clone()));
                }
                entry
                    .unpack(&out)
                    .with_context(|| format!("{}: cannot write", out.display()))?;
            }
        }
    }
    if target.is_none() {
        bail!("the server sent an empty archive");
    }
    // Directory times last: their content changed them.
    for (path, h) in dirs.iter().rev() {
        if let Ok(mtime) = h.mtime() {
            let t = filetime::FileTime::from_unix_time(mtime as i64, 0);
            let _ = filetime::set_file_mtime(path, t);
        }
    }
    if skipped_devices > 0 {
        eprintln!(
            "warning: {skipped_devices} device node(s) not copied (only root can create them)"
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
    fn refuses_escaping_entries() {
        assert!(entry_parts(Path::new("../x")).is_err());
        assert!(entry_parts(Path::new("/etc/passwd")).is_err());
        assert!(entry_parts(Path::new("a/../../x")).is_err());
        assert_eq!(entry_parts(Path::new("./a/b")).unwrap().len(), 2);
    }
}
