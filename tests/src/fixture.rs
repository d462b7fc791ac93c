//! A ready-made test environment: registries, a walt server, two users.

use anyhow::Result;

use crate::image::{BuiltImage, BuiltIndex, Compression, Format, ImageBuilder};
use crate::proxy::Proxy;
use crate::registry::{Registry, RegistryOpts};
use crate::store::{StoreSnapshot, assert_store_unchanged, assert_tmp_empty, store_snapshot};
use crate::walt::{Walt, WaltServer};

/// Credentials of the `secure` registry.
pub const SECURE_USER: &str = "walter";
pub const SECURE_PASS: &str = "s3cret-pass";

/// Which optional parts to start.
#[derive(Debug, Clone, Default)]
pub struct EnvOpts {
    /// `secure`: TLS (verified with the test CA) + basic auth.
    pub secure: bool,
    /// `noverify`: TLS, configured `https-no-verify`.
    pub noverify: bool,
    /// `flaky`: the fault proxy in front of `local`.
    pub proxy: bool,
    /// Give alice the `secure` credentials (default true when `secure`).
    pub alice_without_credentials: bool,
}

/// Registries + walt server + CLIs for alice and bob.
pub struct Env {
    pub images: ImageBuilder,
    /// Plain HTTP registry, label `local`.
    pub local: Registry,
    pub secure: Option<Registry>,
    pub noverify: Option<Registry>,
    pub proxy: Option<Proxy>,
    pub server: WaltServer,
    pub alice: Walt,
    pub bob: Walt,
}

impl Env {
    /// `local` registry only.
    pub fn start() -> Self {
        Self::start_with(EnvOpts::default())
    }

    pub fn start_with(opts: EnvOpts) -> Self {
        Self::try_start(opts).expect("cannot start the test environment")
    }

    pub fn try_start(opts: EnvOpts) -> Result<Self> {
        let local = Registry::start(RegistryOpts::plain())?;
        let secure = opts
            .secure
            .then(|| Registry::start(RegistryOpts::tls_basic(SECURE_USER, SECURE_PASS)))
            .transpose()?;
        let noverify = opts
            .noverify
            .then(|| Registry::start(RegistryOpts::tls()))
            .transpose()?;
        let proxy = opts.proxy.then(|| Proxy::start(local.port())).transpose()?;
        let mut entries = vec![local.server_entry("local")];
        if let Some(r) = &secure {
            entries.push(r.server_entry("secure"));
        }
        if let Some(r) = &noverify {
            entries.push(r.server_entry_no_verify("noverify"));
        }
        if let Some(p) = &proxy {
            entries.push(p.server_entry("flaky"));
        }
        let server = WaltServer::start(&entries)?;
        let creds: Vec<(&str, &str, &str)> = if secure.is_some() && !opts.alice_without_credentials
        {
            vec![("secure", SECURE_USER, SECURE_PASS)]
        } else {
            vec![]
        };
        let alice = server.cli("alice", &creds);
        let bob = server.cli("bob", &creds);
        Ok(Self {
            images: ImageBuilder::new()?,
            local,
            secure,
            noverify,
            proxy,
            server,
            alice,
            bob,
        })
    }

    /// The standard busybox image (OCI, gzip, `pc-x86-64`).
    pub fn busybox(&self) -> BuiltImage {
        self.images
            .busybox_image(Format::Oci, Compression::Gzip, "pc-x86-64")
            .unwrap()
    }

    /// Pushes an image to `local` as `repo:tag`.
    pub fn push_local(&self, repo: &str, tag: &str, img: &BuiltImage) {
        self.local.client().push_image(repo, tag, img).unwrap();
    }

    pub fn push_local_index(&self, repo: &str, tag: &str, idx: &BuiltIndex) {
        self.local.client().push_index(repo, tag, idx).unwrap();
    }

    /// Store snapshot as seen by alice.
    pub fn snapshot(&self) -> StoreSnapshot {
        store_snapshot(&self.server.data_dir(), &self.alice)
    }

    /// Asserts nothing changed since `before` and `tmp/` is empty.
    #[track_caller]
    pub fn assert_unchanged(&self, before: &StoreSnapshot) {
        assert_tmp_empty(&self.server.data_dir());
        assert_store_unchanged(before, &self.server.data_dir(), &self.alice);
    }
}
