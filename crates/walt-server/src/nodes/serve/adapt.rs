//! Per-image adaptations nodes need, written through a freshly mounted
//! (still writable) node mount: they land in the mount's upper dir, never
//! in the image.
//!
//! Every path is resolved inside the image root (`RESOLVE_IN_ROOT`): an
//! image's absolute symlink (`/etc/hosts -> /etc/shadow`) leads to the
//! image's file, never to the server's. A file is replaced by a rename, so
//! a symlink at its place is replaced, not followed.

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// What the adaptations depend on (the same for every image).
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// The server's address on the walt network: the nodes' DNS server.
    pub server_ip: Option<Ipv4Addr>,
    /// The server's ssh public keys (appended to the image's
    /// `/root/.ssh/authorized_keys`); empty: none.
    pub ssh_keys: Vec<u8>,
}

impl Context {
    /// The server's ssh public keys, from `<home>/.ssh/id_*.pub`.
    pub fn read_ssh_keys(home: &Path) -> Vec<u8> {
        let mut keys = Vec::new();
        for name in ["id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub"] {
            if let Ok(k) = read_bounded(&home.join(".ssh").join(name), 64 << 10) {
                keys.extend_from_slice(k.trim_ascii());
                keys.push(b'\n');
            }
        }
        keys
    }
}

fn read_bounded(p: &Path, max: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    std::fs::File::open(p)?.take(max).read_to_end(&mut out)?;
    Ok(out)
}

/// WalT's `/etc/hosts` for nodes.
pub const HOSTS: &str = "127.0.0.1   localhost
::1     localhost ip6-localhost ip6-loopback
ff02::1     ip6-allnodes
ff02::2     ip6-allrouters
";

/// Most entries of `/boot` looked at, and its deepest level.
const BOOT_MAX_ENTRIES: usize = 10_000;
const BOOT_MAX_DEPTH: usize = 8;
/// Largest `authorized_keys` of an image that is extended.
const AUTHORIZED_KEYS_MAX: u64 = 1 << 20;

/// Applies the adaptations to the image mounted at `root`. Returns what was
/// done (for the log); Err: the first adaptation that failed (the caller
/// warns that nodes may not boot the image, and serves it anyway).
pub fn apply(root: &Path, ctx: &Context) -> Result<Vec<String>, String> {
    let mut done = Vec::new();
    let root_fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("opening the image root: {}", io::Error::from(e)))?;
    let etc = dir_in(&root_fd, "etc", true).map_err(|e| format!("/etc: {e}"))?;
    replace_file(&etc, "hosts", HOSTS.as_bytes(), 0o644).map_err(|e| format!("/etc/hosts: {e}"))?;
    done.push("/etc/hosts".to_string());
    if let Some(ip) = ctx.server_ip {
        let resolv = format!("domain walt\nsearch walt.\nnameserver {ip}\n");
        replace_file(&etc, "resolv.conf", resolv.as_bytes(), 0o644)
            .map_err(|e| format!("/etc/resolv.conf: {e}"))?;
        done.push("/etc/resolv.conf".to_string());
    }
    if !ctx.ssh_keys.is_empty() {
        authorize_keys(&root_fd, &ctx.ssh_keys)
            .map_err(|e| format!("/root/.ssh/authorized_keys: {e}"))?;
        done.push("/root/.ssh/authorized_keys".to_string());
    }
    let fixed = relative_boot_links(&root_fd).map_err(|e| format!("/boot: {e}"))?;
    done.extend(fixed);
    done.extend(mount_points(&root_fd)?);
    Ok(done)
}

/// The directories a booting node mounts on (the initramfs moves `/dev`,
/// `/proc`, `/sys`, `/run` there; systemd mounts a tmpfs on `/tmp`): made
/// when the image lacks them (an image built from a tar archive without its
/// empty directories would otherwise panic at boot). Issue 17.
fn mount_points(root: &OwnedFd) -> Result<Vec<String>, String> {
    let how = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
    let mut made = Vec::new();
    for (name, mode) in [
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("run", 0o755),
        ("tmp", 0o1777),
    ] {
        match rustix::fs::openat2(
            root,
            name,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            how,
        ) {
            Ok(_) => continue,
            Err(Errno::NOENT) => {}
            Err(e) => return Err(format!("/{name}: {}", io_err(e))),
        }
        let dir = dir_in(root, name, true).map_err(|e| format!("/{name}: {e}"))?;
        rustix::fs::fchmod(&dir, Mode::from_raw_mode(mode))
            .map_err(|e| format!("/{name}: {}", io_err(e)))?;
        made.push(format!("/{name}"));
    }
    Ok(made)
}

fn io_err(e: Errno) -> io::Error {
    io::Error::from(e)
}

/// Opens (creating it, 0755, when `create`) the directory `rel` of the
/// image, resolved inside the image.
fn dir_in(root: &OwnedFd, rel: &str, create: bool) -> io::Result<OwnedFd> {
    let how = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let mut path = String::new();
    let mut fd = None;
    for comp in rel.split('/').filter(|c| !c.is_empty()) {
        let parent = if path.is_empty() { "." } else { path.as_str() };
        let parent_path = parent.to_string();
        if !path.is_empty() {
            path.push('/');
        }
        path.push_str(comp);
        match rustix::fs::openat2(root, path.as_str(), flags, Mode::empty(), how) {
            Ok(f) => fd = Some(f),
            Err(Errno::NOENT) if create => {
                let p = rustix::fs::openat2(root, parent_path.as_str(), flags, Mode::empty(), how)
                    .map_err(io_err)?;
                match rustix::fs::mkdirat(&p, comp, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(io_err(e)),
                }
                fd = Some(
                    rustix::fs::openat2(root, path.as_str(), flags, Mode::empty(), how)
                        .map_err(io_err)?,
                );
            }
            Err(e) => return Err(io_err(e)),
        }
    }
    match fd {
        Some(f) => Ok(f),
        None => rustix::fs::openat2(root, ".", flags, Mode::empty(), how).map_err(io_err),
    }
}

/// Writes `content` as `dir/name` (mode `mode`, owner root) through a
/// temporary file renamed over it.
fn replace_file(dir: &OwnedFd, name: &str, content: &[u8], mode: u32) -> io::Result<()> {
    let tmp = format!(".walt-tmp-{name}");
    let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
    let fd = rustix::fs::openat(
        dir,
        tmp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )
    .map_err(io_err)?;
    let mut f = std::fs::File::from(fd);
    let written = f
        .write_all(content)
        .and_then(|()| rustix::fs::fchmod(f.as_fd(), Mode::from_raw_mode(mode)).map_err(io_err));
    drop(f);
    let r =
        written.and_then(|()| rustix::fs::renameat(dir, tmp.as_str(), dir, name).map_err(io_err));
    if r.is_err() {
        let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
    }
    r
}

/// Appends the keys missing from the image's `/root/.ssh/authorized_keys`.
fn authorize_keys(root: &OwnedFd, keys: &[u8]) -> io::Result<()> {
    let ssh = dir_in(root, "root/.ssh", true)?;
    let how = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
    let mut old = Vec::new();
    match rustix::fs::openat2(
        root,
        "root/.ssh/authorized_keys",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        how,
    ) {
        Ok(fd) => {
            let st = rustix::fs::fstat(&fd).map_err(io_err)?;
            if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile {
                std::fs::File::from(fd)
                    .take(AUTHORIZED_KEYS_MAX)
                    .read_to_end(&mut old)?;
            }
        }
        Err(Errno::NOENT) => {}
        Err(e) => return Err(io_err(e)),
    }
    let mut new = old.clone();
    for key in keys.split(|b| *b == b'\n').filter(|k| !k.is_empty()) {
        if old
            .split(|b| *b == b'\n')
            .any(|l| l.trim_ascii() == key.trim_ascii())
        {
            continue;
        }
        if !new.is_empty() && !new.ends_with(b"\n") {
            new.push(b'\n');
        }
        new.extend_from_slice(key);
        new.push(b'\n');
    }
    if new == old {
        return Ok(());
    }
    rustix::fs::fchmod(&ssh, Mode::from_raw_mode(0o700)).map_err(io_err)?;
    replace_file(&ssh, "authorized_keys", &new, 0o600)
}

/// Boot files are read over TFTP from the server's side, where an absolute
/// symlink would point into the server's own tree: the absolute symlinks
/// below `/boot` become relative to their directory in the image.
fn relative_boot_links(root: &OwnedFd) -> io::Result<Vec<String>> {
    let mut fixed = Vec::new();
    // /boot itself may be a link: the walk below goes where it leads, and
    // the depth of the links' directories is counted there.
    let mut boot_path = "boot".to_string();
    if let Ok(st) = rustix::fs::statat(root, "boot", AtFlags::SYMLINK_NOFOLLOW)
        && FileType::from_raw_mode(st.st_mode) == FileType::Symlink
    {
        let target = rustix::fs::readlinkat(root, "boot", Vec::new()).map_err(io_err)?;
        if let Some(rel) = boot_link_target("", target.as_bytes()) {
            replace_link(root, c"boot", &rel)?;
            fixed.push(format!("/boot -> {}", String::from_utf8_lossy(&rel)));
        }
        let (parts, _) = resolve_lexically("", target.as_bytes());
        boot_path = String::from_utf8_lossy(&parts.join(&b'/')).into_owned();
    }
    let boot = match dir_in(root, "boot", false) {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut seen = 0usize;
    // (dir, its path in the image, e.g. "boot/pc-x86-64")
    let mut stack = vec![(boot, boot_path)];
    while let Some((dir, path)) = stack.pop() {
        let depth = path.split('/').filter(|c| !c.is_empty()).count();
        let mut names = Vec::new();
        for e in rustix::fs::Dir::read_from(&dir).map_err(io_err)? {
            let e = e.map_err(io_err)?;
            let name = e.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            seen += 1;
            if seen > BOOT_MAX_ENTRIES {
                return Err(io::Error::other(format!(
                    "more than {BOOT_MAX_ENTRIES} entries, the rest left as they are"
                )));
            }
            names.push((CString::new(name).map_err(io::Error::other)?, e.file_type()));
        }
        for (name, ft) in names {
            let ft = match ft {
                FileType::Unknown => {
                    let st = rustix::fs::statat(&dir, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(io_err)?;
                    FileType::from_raw_mode(st.st_mode)
                }
                ft => ft,
            };
            let shown = format!("{path}/{}", name.to_string_lossy());
            let shown = format!("/{}", shown.trim_start_matches('/'));
            match ft {
                FileType::Symlink => {
                    let target = rustix::fs::readlinkat(&dir, name.as_c_str(), Vec::new())
                        .map_err(io_err)?;
                    let Some(rel) = boot_link_target(&path, target.as_bytes()) else {
                        continue;
                    };
                    replace_link(&dir, name.as_c_str(), &rel)?;
                    fixed.push(format!("{shown} -> {}", String::from_utf8_lossy(&rel)));
                }
                FileType::Directory if depth < BOOT_MAX_DEPTH => {
                    let sub = rustix::fs::openat(
                        &dir,
                        name.as_c_str(),
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(io_err)?;
                    let sub_path = if path.is_empty() {
                        name.to_string_lossy().into_owned()
                    } else {
                        format!("{path}/{}", name.to_string_lossy())
                    };
                    stack.push((sub, sub_path));
                }
                _ => {}
            }
        }
    }
    Ok(fixed)
}

/// Where a link in the image directory `dir` to `target` leads inside the
/// image, lexically (`..` stops at the root): its components, and whether
/// the target is absolute or climbs above the root.
fn resolve_lexically<'a>(dir: &'a str, target: &'a [u8]) -> (Vec<&'a [u8]>, bool) {
    let mut parts: Vec<&[u8]> = Vec::new();
    let mut escapes = target.starts_with(b"/");
    if !escapes {
        parts.extend(dir.split('/').filter(|c| !c.is_empty()).map(str::as_bytes));
    }
    for c in target.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if parts.pop().is_none() {
                    escapes = true;
                }
            }
            c => parts.push(c),
        }
    }
    (parts, escapes)
}

/// Makes `dir/name` a symlink to `target` (temporary link + rename).
fn replace_link(dir: &OwnedFd, name: &std::ffi::CStr, target: &[u8]) -> io::Result<()> {
    let tmp = CString::new([b".walt-tmp-", name.to_bytes()].concat()).map_err(io::Error::other)?;
    let _ = rustix::fs::unlinkat(dir, tmp.as_c_str(), AtFlags::empty());
    rustix::fs::symlinkat(target, dir, tmp.as_c_str()).map_err(io_err)?;
    rustix::fs::renameat(dir, tmp.as_c_str(), dir, name).map_err(io_err)
}

/// The target a symlink in the image directory `dir` (`boot/x`, no leading
/// `/`) must get so that the server's side (tftpd follows links on the
/// server) reaches what the link names inside the image: None when
/// `target` already does (relative, never above the image root); else the
/// target resolved as inside the image (`..` stops at its root) written
/// relative to `dir`. An absolute target, or a relative one climbing above
/// the root (`../../../../etc/shadow`), would otherwise lead to the
/// server's own files.
fn boot_link_target(dir: &str, target: &[u8]) -> Option<Vec<u8>> {
    let (parts, escapes) = resolve_lexically(dir, target);
    if !escapes {
        return None;
    }
    let depth = dir.split('/').filter(|c| !c.is_empty()).count();
    let mut rel = b"../".repeat(depth);
    rel.extend_from_slice(&parts.join(&b'/'));
    if parts.is_empty() {
        // The image root itself.
        rel.pop();
        if rel.is_empty() {
            rel.push(b'.');
        }
    }
    Some(rel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn adapts_a_tree_without_leaving_it() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), "server file").unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("boot/pc-x86-64")).unwrap();
        std::fs::create_dir_all(root.join("root/.ssh")).unwrap();
        // An absolute symlink that would lead out of the image if followed
        // on the server's side.
        std::os::unix::fs::symlink(outside.join("secret"), root.join("etc/hosts")).unwrap();
        std::fs::write(root.join("root/.ssh/authorized_keys"), "ssh-rsa OLD user").unwrap();
        std::fs::write(root.join("boot/vmlinuz-1"), "kernel").unwrap();
        std::os::unix::fs::symlink("/boot/vmlinuz-1", root.join("boot/pc-x86-64/kernel")).unwrap();
        std::os::unix::fs::symlink("initrd.img", root.join("boot/pc-x86-64/initrd")).unwrap();
        std::os::unix::fs::symlink(
            "../../../../../../../../../etc/passwd",
            root.join("boot/pc-x86-64/escape"),
        )
        .unwrap();
        let ctx = Context {
            server_ip: Some(Ipv4Addr::new(192, 168, 152, 1)),
            ssh_keys: b"ssh-ed25519 KEY root@server\n".to_vec(),
        };
        let done = apply(&root, &ctx).unwrap();
        assert_eq!(
            std::fs::read_to_string(outside.join("secret")).unwrap(),
            "server file"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hosts")).unwrap(),
            HOSTS
        );
        let m = std::fs::symlink_metadata(root.join("etc/hosts")).unwrap();
        assert!(m.is_file());
        assert_eq!(m.permissions().mode() & 0o777, 0o644);
        assert!(
            std::fs::read_to_string(root.join("etc/resolv.conf"))
                .unwrap()
                .contains("nameserver 192.168.152.1\n")
        );
        assert_eq!(
            std::fs::read_to_string(root.join("root/.ssh/authorized_keys")).unwrap(),
            "ssh-rsa OLD user\nssh-ed25519 KEY root@server\n"
        );
        assert_eq!(
            std::fs::read_link(root.join("boot/pc-x86-64/kernel")).unwrap(),
            Path::new("../../boot/vmlinuz-1")
        );
        assert_eq!(
            std::fs::read_to_string(root.join("boot/pc-x86-64/kernel")).unwrap(),
            "kernel"
        );
        assert_eq!(
            std::fs::read_link(root.join("boot/pc-x86-64/initrd")).unwrap(),
            Path::new("initrd.img")
        );
        assert!(
            done.iter().any(|d| d.starts_with("/boot/pc-x86-64/kernel")),
            "{done:?}"
        );
        // Twice: the key is not added again.
        apply(&root, &ctx).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("root/.ssh/authorized_keys")).unwrap(),
            "ssh-rsa OLD user\nssh-ed25519 KEY root@server\n"
        );
    }

    #[test]
    fn boot_links_are_made_to_stay_in_the_image() {
        let t = |dir, target: &str| {
            boot_link_target(dir, target.as_bytes()).map(|v| String::from_utf8(v).unwrap())
        };
        assert_eq!(
            t("boot/x", "/boot/vmlinuz"),
            Some("../../boot/vmlinuz".into())
        );
        assert_eq!(t("boot", "/etc/../boot/k"), Some("../boot/k".into()));
        assert_eq!(t("boot/x", "../vmlinuz"), None);
        assert_eq!(t("boot/x", "../../usr/lib/k"), None);
        assert_eq!(t("boot", "initrd.img"), None);
        assert_eq!(
            t("boot/x", "../../../../../etc/shadow"),
            Some("../../etc/shadow".into())
        );
        assert_eq!(t("boot", "../.."), Some("..".into()));
        assert_eq!(t("boot", "/"), Some("..".into()));
    }

    #[test]
    fn an_empty_image_gets_etc_and_no_resolv_without_server_ip() {
        let t = tempfile::tempdir().unwrap();
        apply(t.path(), &Context::default()).unwrap();
        assert_eq!(
            std::fs::read_to_string(t.path().join("etc/hosts")).unwrap(),
            HOSTS
        );
        assert!(!t.path().join("etc/resolv.conf").exists());
        assert!(!t.path().join("root").exists());
        // The mount points of a booting node.
        use std::os::unix::fs::PermissionsExt;
        for (d, mode) in [
            ("dev", 0o755),
            ("proc", 0o555),
            ("sys", 0o555),
            ("run", 0o755),
            ("tmp", 0o1777),
        ] {
            let md = std::fs::metadata(t.path().join(d)).unwrap();
            assert!(md.is_dir(), "{d}");
            assert_eq!(md.permissions().mode() & 0o7777, mode, "{d}");
        }
        // An image that has them keeps them as they are.
        std::fs::set_permissions(t.path().join("tmp"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        apply(t.path(), &Context::default()).unwrap();
        let md = std::fs::metadata(t.path().join("tmp")).unwrap();
        assert_eq!(md.permissions().mode() & 0o7777, 0o700);
    }

    #[test]
    fn an_absolute_boot_link_is_made_relative() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir_all(root.join("real-boot/pc-x86-64")).unwrap();
        std::fs::write(root.join("real-boot/k"), "kernel").unwrap();
        std::os::unix::fs::symlink("/real-boot", root.join("boot")).unwrap();
        std::os::unix::fs::symlink("/real-boot/k", root.join("real-boot/pc-x86-64/k")).unwrap();
        apply(root, &Context::default()).unwrap();
        assert_eq!(
            std::fs::read_link(root.join("boot")).unwrap(),
            Path::new("real-boot")
        );
        assert_eq!(
            std::fs::read_to_string(root.join("boot/pc-x86-64/k")).unwrap(),
            "kernel"
        );
    }

    #[test]
    fn a_boot_link_to_the_root_counts_from_the_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("pc-x86-64")).unwrap();
        std::os::unix::fs::symlink("/", root.join("boot")).unwrap();
        std::os::unix::fs::symlink("/k", root.join("pc-x86-64/k")).unwrap();
        apply(&root, &Context::default()).unwrap();
        assert_eq!(
            std::fs::read_link(root.join("boot")).unwrap(),
            Path::new(".")
        );
        assert_eq!(
            std::fs::read_link(root.join("pc-x86-64/k")).unwrap(),
            Path::new("../k")
        );
    }

    #[test]
    fn a_symlinked_etc_stays_in_the_image() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("real-etc")).unwrap();
        // /etc -> <server's outside dir>: resolved in the image, this is
        // /<outside path> inside the image, which does not exist there.
        std::os::unix::fs::symlink(&outside, root.join("etc")).unwrap();
        let _ = apply(&root, &Context::default());
        assert!(!outside.join("hosts").exists());
    }
}
