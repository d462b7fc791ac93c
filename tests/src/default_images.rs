//! The real default images of `images/` (Debian systems built by
//! `images/build.sh`) for the tests, built once per recipe and kept as OCI
//! layouts under `$WALT_CI_CACHE/default-images/` (default
//! `/var/cache/walt-ci`, created when missing).
//!
//! [`default_image`] builds a recipe when its layout is not there: a private
//! registry, `images/build.sh --push 127.0.0.1:<port> <recipe>` with the
//! debug binaries of this build (`WALT_BIN`) and the root filesystem cache
//! `$WALT_CI_CACHE/images` (`WALT_IMAGES_CACHE`), then every
//! `waltplatform/*-default:latest` it published is copied (`skopeo copy --all
//! --preserve-digests`) into the layout `<recipe>-<key>/`, one reference per
//! repository (`pc-x86-64-default`, or `rpi-3-b-default`, `rpi-4-b-default`…
//! for a recipe published under several models' names). Concurrent test
//! processes build it once: the build holds an exclusive `flock` on
//! `<recipe>.lock`, and the layout appears by a rename when complete. Tests
//! then seed their own registry from the layout ([`DefaultImage::seed`],
//! same digests).
//!
//! The key hashes the recipe's inputs: `images/build.sh`, every file of
//! `images/<recipe>-default/` and of `images/common/` when it exists (names,
//! modes, contents). It leaves walt's own code out on purpose: the layout is
//! a plain OCI image, a fixture for the node side, and what it holds comes
//! from Debian's packages and the recipe; walt's build and publish are tested
//! by their own tests (and build.sh checks what it built each time it runs).
//! Keying on walt's binaries would rebuild it on every change of the code
//! (about 30 s with the root filesystem cached, 2.5 min without). To force a
//! rebuild, remove `$WALT_CI_CACHE/default-images/<recipe>-*`.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::registry::{Registry, RegistryOpts};
use crate::util::{run_cmd, target_profile_dir};

/// The variable naming the CI cache directory.
pub const CACHE_ENV: &str = "WALT_CI_CACHE";

/// The CI cache directory: `$WALT_CI_CACHE`, else `/var/cache/walt-ci`.
pub fn cache_root() -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/walt-ci"))
}

/// Where the layouts are: `<cache>/default-images`.
pub fn layouts_dir() -> PathBuf {
    cache_root().join("default-images")
}

/// The root of the workspace (the parent of `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `images/<recipe>-default/`.
pub fn recipe_dir(recipe: &str) -> PathBuf {
    workspace_root()
        .join("images")
        .join(format!("{recipe}-default"))
}

/// Whether `dir` holds an image recipe as `images/build.sh` reads them: a
/// `recipe.conf` (one platform) or platform sub-directories with one each.
fn is_recipe_dir(dir: &Path) -> bool {
    dir.join("recipe.conf").is_file()
        || std::fs::read_dir(dir)
            .is_ok_and(|rd| rd.flatten().any(|e| e.path().join("recipe.conf").is_file()))
}

/// The recipes of `images/` (directories `<recipe>-default/` with a
/// `recipe.conf`, or platform sub-directories with one), sorted.
pub fn recipes() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(workspace_root().join("images"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| is_recipe_dir(&e.path()))
                .filter_map(|e| {
                    let name = e.file_name().to_str()?.to_string();
                    Some(name.strip_suffix("-default")?.to_string())
                })
                .filter(|r| valid_recipe(r))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn valid_recipe(recipe: &str) -> bool {
    !recipe.is_empty()
        && recipe.len() <= 64
        && !recipe.starts_with('-')
        && recipe
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn check_recipe(recipe: &str) -> Result<PathBuf> {
    if !valid_recipe(recipe) {
        bail!("invalid recipe name '{recipe}' (expected [a-z0-9-], e.g. pc-x86-64)");
    }
    let dir = recipe_dir(recipe);
    if !is_recipe_dir(&dir) {
        bail!(
            "no recipe for '{recipe}': {} has no recipe.conf",
            dir.display()
        );
    }
    Ok(dir)
}

/// Feeds every file under `dir` (sorted relative names, prefixed by
/// `label`) into `h`: name, mode, and contents (or a symlink's target).
fn hash_tree(h: &mut Sha256, label: &str, base: &Path, dir: &Path) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot read {}", dir.display()))?;
    entries.sort();
    for p in entries {
        let md = p
            .symlink_metadata()
            .with_context(|| format!("cannot stat {}", p.display()))?;
        let rel = p.strip_prefix(base).unwrap_or(&p);
        if md.is_dir() {
            hash_tree(h, label, base, &p)?;
            continue;
        }
        h.update(format!("{label}/{}\0{:o}\0", rel.display(), md.mode()).as_bytes());
        if md.file_type().is_symlink() {
            h.update(std::fs::read_link(&p)?.as_os_str().as_encoded_bytes());
        } else {
            let data = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
            h.update(Sha256::digest(&data));
        }
        h.update(b"\n");
    }
    Ok(())
}

/// The key of a recipe: 16 hex digits of a hash of `images/build.sh`,
/// `images/<recipe>-default/**` and `images/common/**` (when present).
pub fn recipe_key(recipe: &str) -> Result<String> {
    check_recipe(recipe)?;
    recipe_key_in(&workspace_root().join("images"), recipe)
}

/// [`recipe_key`] of the recipe `recipe` of the directory `images`.
pub fn recipe_key_in(images: &Path, recipe: &str) -> Result<String> {
    let dir = images.join(format!("{recipe}-default"));
    let mut h = Sha256::new();
    let build = images.join("build.sh");
    let script =
        std::fs::read(&build).with_context(|| format!("cannot read {}", build.display()))?;
    h.update(b"build.sh\0");
    h.update(Sha256::digest(&script));
    hash_tree(&mut h, "recipe", &dir, &dir)?;
    let common = images.join("common");
    if common.is_dir() {
        hash_tree(&mut h, "common", &common, &common)?;
    }
    Ok(hex::encode(h.finalize())[..16].to_string())
}

/// A default image's OCI layout in the cache.
#[derive(Debug, Clone)]
pub struct DefaultImage {
    pub recipe: String,
    pub key: String,
    pub layout: PathBuf,
}

impl DefaultImage {
    fn index(&self) -> Result<Value> {
        let p = self.layout.join("index.json");
        let data = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_json::from_slice(&data).with_context(|| format!("{}: not JSON", p.display()))
    }

    /// The references of the layout (`pc-x86-64-default`…: the repositories
    /// under `waltplatform/` it was published as), sorted.
    pub fn refs(&self) -> Result<Vec<String>> {
        let mut v: Vec<String> = self
            .index()?
            .get("manifests")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|d| {
                        d.pointer("/annotations/org.opencontainers.image.ref.name")?
                            .as_str()
                            .map(str::to_string)
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v.dedup();
        Ok(v)
    }

    /// The descriptor (`mediaType`, `digest`, `size`) of reference `name`.
    pub fn descriptor(&self, name: &str) -> Result<Value> {
        let index = self.index()?;
        index
            .get("manifests")
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter().find(|d| {
                    d.pointer("/annotations/org.opencontainers.image.ref.name")
                        .and_then(Value::as_str)
                        == Some(name)
                })
            })
            .cloned()
            .with_context(|| format!("{}: no reference {name}", self.layout.display()))
    }

    /// A blob of the layout by digest (`sha256:…`).
    pub fn blob(&self, digest: &str) -> Result<Vec<u8>> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .with_context(|| format!("unexpected digest {digest}"))?;
        let p = self.layout.join("blobs/sha256").join(hex);
        std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))
    }

    /// A JSON blob of the layout.
    pub fn json(&self, digest: &str) -> Result<Value> {
        serde_json::from_slice(&self.blob(digest)?)
            .with_context(|| format!("{}: blob {digest} is not JSON", self.layout.display()))
    }

    /// Copies every reference into `registry` as
    /// `waltplatform/<ref>:latest` (all platforms, same digests). Returns
    /// the repositories.
    pub fn seed(&self, registry: &Registry) -> Result<Vec<String>> {
        let mut repos = Vec::new();
        for r in self.refs()? {
            let repo = format!("waltplatform/{r}");
            skopeo_copy(
                &format!("oci:{}:{r}", self.layout.display()),
                &format!("docker://{}/{repo}:latest", registry.host_port()),
            )?;
            repos.push(repo);
        }
        if repos.is_empty() {
            bail!("{}: the layout has no reference", self.layout.display());
        }
        Ok(repos)
    }
}

/// `skopeo copy --all --preserve-digests` between a plain-http registry on
/// 127.0.0.1 and an OCI layout (either way).
fn skopeo_copy(src: &str, dest: &str) -> Result<()> {
    run_cmd(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--all", "--preserve-digests"])
            .args(["--src-tls-verify=false", "--dest-tls-verify=false"])
            .arg(src)
            .arg(dest),
    )
    .with_context(|| format!("skopeo copy {src} {dest}"))?;
    Ok(())
}

/// Copies the `repos` of the registry at `host_port` (their `latest`
/// tags) into the OCI layout `dest` (created), one reference per
/// repository: its name without `waltplatform/`.
pub fn save_layout(host_port: &str, repos: &[String], dest: &Path) -> Result<()> {
    for repo in repos {
        let name = repo.strip_prefix("waltplatform/").unwrap_or(repo);
        skopeo_copy(
            &format!("docker://{host_port}/{repo}:latest"),
            &format!("oci:{}:{name}", dest.display()),
        )?;
    }
    Ok(())
}

/// The cached layout of `recipe` for the current recipe inputs, if built.
pub fn cached(recipe: &str) -> Result<Option<DefaultImage>> {
    let key = recipe_key(recipe)?;
    let layout = layouts_dir().join(format!("{recipe}-{key}"));
    Ok(layout.join("index.json").is_file().then(|| DefaultImage {
        recipe: recipe.to_string(),
        key,
        layout,
    }))
}

/// An exclusive `flock` on a file, released on drop (with the file).
struct Lock {
    _file: File,
}

impl Lock {
    fn exclusive(path: &Path) -> Result<Self> {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        loop {
            // SAFETY: flock(2) on a descriptor this File owns.
            let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(Lock { _file: f });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
    }
}

/// The layout of `recipe`'s default image, built first when the cache has
/// none for the current inputs (once, whatever the number of processes
/// asking at the same time). Needs root, mmdebstrap, skopeo and
/// docker-registry; the build's output goes to
/// `<cache>/default-images/<recipe>-<key>.log`.
pub fn default_image(recipe: &str) -> Result<DefaultImage> {
    if let Some(img) = cached(recipe)? {
        return Ok(img);
    }
    let dir = layouts_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let _lock = Lock::exclusive(&dir.join(format!("{recipe}.lock")))?;
    // Another process may have built it while this one waited.
    if let Some(img) = cached(recipe)? {
        return Ok(img);
    }
    build(recipe)
}

fn build(recipe: &str) -> Result<DefaultImage> {
    let key = recipe_key(recipe)?;
    let dir = layouts_dir();
    let name = format!("{recipe}-{key}");
    let layout = dir.join(&name);
    let part = dir.join(format!("{name}.part"));
    if part.exists() {
        std::fs::remove_dir_all(&part)
            .with_context(|| format!("cannot remove {}", part.display()))?;
    }
    let bin = target_profile_dir();
    for b in ["walt", "walt-server"] {
        if !bin.join(b).is_file() {
            bail!(
                "{} not found: run `cargo build --bins -p walt-server -p walt-cli` first",
                bin.join(b).display()
            );
        }
    }
    let rootfs_cache = cache_root().join("images");
    std::fs::create_dir_all(&rootfs_cache)
        .with_context(|| format!("cannot create {}", rootfs_cache.display()))?;

    let registry = Registry::start(RegistryOpts::plain())?;
    let log_path = dir.join(format!("{name}.log"));
    let mut log =
        File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    writeln!(
        log,
        "images/build.sh --push {} {recipe}-default (WALT_BIN={}, WALT_IMAGES_CACHE={})",
        registry.host_port(),
        bin.display(),
        rootfs_cache.display()
    )?;
    let status = Command::new(workspace_root().join("images/build.sh"))
        .arg("--push")
        .arg(registry.host_port())
        .arg(format!("{recipe}-default"))
        .env("WALT_BIN", &bin)
        .env("WALT_IMAGES_CACHE", &rootfs_cache)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("cannot run images/build.sh")?;
    if !status.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "images/build.sh {recipe} failed ({status}); the end of {}:\n{}",
            log_path.display(),
            tail.join("\n")
        );
    }

    // What it published: every waltplatform/*-default repository.
    let r = registry
        .client()
        .request("GET", "/v2/_catalog", &[], None)?;
    if r.status != 200 {
        bail!(
            "GET /v2/_catalog of the build's registry: HTTP {}",
            r.status
        );
    }
    let catalog: Value = serde_json::from_slice(&r.body).context("/v2/_catalog: not JSON")?;
    let repos: Vec<String> = catalog
        .get("repositories")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .filter(|r| r.starts_with("waltplatform/") && r.ends_with("-default"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if repos.is_empty() {
        bail!(
            "images/build.sh {recipe} published no waltplatform/*-default image (catalog: {catalog})"
        );
    }
    save_layout(&registry.host_port(), &repos, &part)?;
    std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&part, &layout)
        .with_context(|| format!("cannot rename {} to {}", part.display(), layout.display()))?;

    // The layouts of older inputs of this recipe are of no more use.
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let stale = n
                .strip_prefix(&format!("{recipe}-"))
                .is_some_and(|k| k.len() == 16 && k.bytes().all(|b| b.is_ascii_hexdigit()))
                && n != name;
            if stale {
                let _ = std::fs::remove_dir_all(e.path());
                let _ = std::fs::remove_file(dir.join(format!("{n}.log")));
            }
        }
    }
    Ok(DefaultImage {
        recipe: recipe.to_string(),
        key,
        layout,
    })
}
