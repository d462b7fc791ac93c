//! The real default images of `images/` through the node side: a fresh
//! server with an empty store, the image only in a local registry (seeded
//! from the cached OCI layout, `walt_e2e::default_images`), a DHCP lease of
//! a node of the model through the real hook: the server fetches the
//! default image (the model's platform from an index), mounts it, a real
//! tftpd-hpa serves the node its boot script and the files it names, the
//! exports file lists the mount and a real nfs-ganesha serves its root.
//!
//! `pc-x86-64` is built when missing (tests/run builds it beforehand). The
//! other recipes (`cached_*`, ignored) run only when tests/run finds their
//! layout cached; run by hand, they fail when it is not.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use walt_e2e::default_images::{self, DefaultImage};
use walt_e2e::dhcp::{DeviceRow, devices};
use walt_e2e::netserve::{Ganesha, Tftpd, exports_entries};
use walt_e2e::util::wait_for;
use walt_e2e::{Compression, Format, ImageBuilder, ImageConfig, RawEntry};
use walt_e2e::{Registry, RegistryOpts, WaltServer};

/// A fresh server whose only image source is `local` (seeded with `img`).
struct Bed {
    _local: Registry,
    server: WaltServer,
    img: DefaultImage,
}

impl Bed {
    fn start(img: DefaultImage) -> Self {
        let local = Registry::start(RegistryOpts::plain()).unwrap();
        img.seed(&local).unwrap();
        // A Docker socket where nothing listens: the registry is the only
        // source.
        let config = format!(
            "network:\n  walt-net:\n    ip: 192.168.152.1/24\nregistries:\n{}docker:\n    socket: {}\n",
            local.server_entry("local"),
            std::env::temp_dir()
                .join(format!("walt-e2e-no-docker-{}.sock", std::process::id()))
                .display()
        );
        let server = WaltServer::start_with_config(&config).unwrap();
        // The store is empty.
        let n: i64 = walt_e2e::dhcp::store_db(&server.data_dir())
            .unwrap()
            .query_row("SELECT COUNT(*) FROM images", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0, "the store of a new server holds images");
        Bed {
            _local: local,
            server,
            img,
        }
    }

    fn data(&self) -> PathBuf {
        self.server.data_dir()
    }

    fn lease(&self, model: &str, mac: &str, ip: &str) {
        self.server
            .dhcp_event(&[
                "commit",
                &format!("walt.node.{model}"),
                "",
                ip,
                mac,
                "",
                "0",
                "unknown",
            ])
            .assert_success();
    }

    fn device(&self, mac: &str) -> Option<DeviceRow> {
        devices(&self.data())
            .ok()?
            .into_iter()
            .find(|d| d.mac == mac)
    }

    /// The manifest digest a node of `model` must boot: the layout's
    /// `<model>-default` reference, or from an index the first entry of the
    /// model's platforms (in their order of preference).
    fn expected_manifest(&self, model: &str) -> String {
        let desc = self.img.descriptor(&format!("{model}-default")).unwrap();
        let digest = desc["digest"].as_str().unwrap().to_string();
        let doc = self.img.json(&digest).unwrap();
        let Some(entries) = doc.get("manifests").and_then(Value::as_array) else {
            return digest;
        };
        let platforms = walt_core::models::model_platforms(model)
            .unwrap_or_else(|| panic!("walt does not know the model {model}"));
        for p in platforms {
            if let Some(e) = entries.iter().find(|e| {
                p.matches(
                    e.pointer("/platform/architecture")
                        .and_then(Value::as_str)
                        .unwrap_or(""),
                    e.pointer("/platform/variant").and_then(Value::as_str),
                )
            }) {
                return e["digest"].as_str().unwrap().to_string();
            }
        }
        panic!("{model}-default: the index has no entry for {platforms:?}: {doc}");
    }

    /// A node of `model` (a new MAC) at 127.0.0.1, where the TFTP client
    /// runs: checks what it boots, through TFTP and NFS. `script` is its
    /// boot script under `/boot/<model>/`; `recipe_script` the file it must
    /// equal; `root_files`, files its root must have (absolute, links
    /// followed inside the image). Then the node moves to `moved_ip`,
    /// freeing 127.0.0.1. Returns the mount id (the manifest's hex).
    fn check_node(&self, n: &NodeCheck) -> String {
        let model = n.model;
        let expected = self.expected_manifest(model);
        let config_digest = self.img.json(&expected).unwrap()["config"]["digest"]
            .as_str()
            .unwrap()
            .to_string();
        let config = self.img.json(&config_digest).unwrap();
        let label = config
            .pointer("/config/Labels/walt.node.models")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{model}: no walt.node.models label: {config}"));
        assert!(
            walt_core::models::parse_models(label).contains(&model.to_string()),
            "{model}: label {label}"
        );

        // The lease through the real hook: the default image is fetched
        // and the device becomes a node booting it.
        self.lease(model, n.mac, "127.0.0.1");
        let dev = wait_for(
            &format!("{} ({model}) to be a node", n.mac),
            Duration::from_secs(240),
            || self.device(n.mac).filter(|d| d.kind == "node"),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}\n{:?}\nserver log:\n{}",
                self.device(n.mac),
                self.server.log()
            )
        });
        assert_eq!(
            dev.image.as_deref(),
            Some(&*format!("waltplatform/{model}-default:latest"))
        );
        assert_eq!(dev.manifest.as_deref(), Some(&*expected), "{model}");
        let log = self.server.log();
        assert!(
            log.contains(&format!(
                "default image of {model} downloaded from local:waltplatform/{model}-default:latest"
            )),
            "{log}"
        );
        let id = expected.strip_prefix("sha256:").unwrap().to_string();

        // Served: the node's tree points to the mount.
        let data = self.data();
        let nodes = data.join("nodes");
        wait_for(
            &format!("127.0.0.1 to be {} and its boot script there", n.mac),
            Duration::from_secs(60),
            || {
                (std::fs::read_link(nodes.join("127.0.0.1")).ok()? == Path::new(n.mac)
                    && nodes.join("127.0.0.1/tftp").join(n.script).is_file())
                .then_some(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", self.server.log()));
        assert_eq!(
            std::fs::read_link(nodes.join(n.mac).join("fs")).unwrap(),
            PathBuf::from(format!("../../images/{id}/fs"))
        );
        let fs = data.join("images").join(&id).join("fs");
        let boot = Path::new("/boot").join(model);
        let in_image = std::fs::read(resolve_in(&fs, &boot.join(n.script)).unwrap()).unwrap();
        if let Some(r) = &n.recipe_script {
            assert_eq!(
                in_image,
                std::fs::read(r).unwrap(),
                "/boot/{model}/{} differs from {}",
                n.script,
                r.display()
            );
        }

        // A real tftpd-hpa with walt's remap file: the boot script, then
        // what it names.
        let tftpd = Tftpd::start(&self.server.tftp_map_file(), &data.join("tftp-root")).unwrap();
        let script = tftpd.get(n.script).unwrap();
        assert_eq!(script, in_image, "{model}: {} through TFTP", n.script);
        if n.script.ends_with(".ipxe") {
            let text = String::from_utf8(script).unwrap();
            let (kernel, initrd) = ipxe_files(&text);
            let k = tftpd.get(&kernel).unwrap();
            assert!(is_bzimage(&k), "{model}: {kernel} is no bzImage");
            let i = tftpd.get(&initrd).unwrap();
            assert!(is_initramfs(&i), "{model}: {initrd} is no initramfs");
            // The same bytes as the image's files (links followed inside it).
            for (name, got) in [(&kernel, &k), (&initrd, &i)] {
                let p = resolve_in(&fs, &boot.join(name)).unwrap();
                assert_eq!(&std::fs::read(&p).unwrap(), got, "{model}: {name}");
            }
        }
        drop(tftpd);

        // The exports file lists the mount; nfs-ganesha exports it and the
        // node reads its root.
        let exports = std::fs::read_to_string(self.server.exports_file()).unwrap();
        let root = format!("{}/images/{id}/fs", data.display());
        let paths: Vec<PathBuf> = exports_entries(&exports)
            .into_iter()
            .filter(|(_, fsid)| fsid.is_some())
            .map(|(p, _)| p)
            .collect();
        assert!(paths.contains(&PathBuf::from(&root)), "{exports}");
        let nfs = Ganesha::start(&[PathBuf::from(&root)]).unwrap();
        for f in n.root_files {
            let p = resolve_in(&fs, Path::new(f))
                .unwrap_or_else(|e| panic!("{model}: {f} in the image: {e}"));
            assert!(p.is_file(), "{model}: {f} -> {} is no file", p.display());
            let rel = p.strip_prefix(&fs).unwrap();
            let parent = Path::new(&root).join(rel.parent().unwrap());
            let names = nfs.ls(&parent.to_string_lossy()).unwrap();
            let base = rel.file_name().unwrap().to_string_lossy();
            assert!(
                names.iter().any(|x| *x == base),
                "{model}: {f} ({}) not listed through NFS: {names:?}",
                rel.display()
            );
        }
        drop(nfs);

        // Free 127.0.0.1 for the next node.
        self.lease(model, n.mac, n.moved_ip);
        wait_for(
            &format!("{} to move to {}", n.mac, n.moved_ip),
            Duration::from_secs(30),
            || (self.device(n.mac)?.ip.as_deref() == Some(n.moved_ip)).then_some(()),
        )
        .unwrap();
        id
    }
}

struct NodeCheck<'a> {
    model: &'a str,
    mac: &'a str,
    moved_ip: &'a str,
    script: &'a str,
    recipe_script: Option<PathBuf>,
    root_files: &'a [&'a str],
}

/// The kernel and initrd an iPXE script loads (`kernel <file> …`,
/// `initrd <file>`).
fn ipxe_files(text: &str) -> (String, String) {
    let arg = |cmd: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some(cmd))
                    .then(|| w.find(|a| !a.starts_with("--")))
                    .flatten()
            })
            .unwrap_or_else(|| panic!("no `{cmd}` line in the iPXE script:\n{text}"))
            .to_string()
    };
    (arg("kernel"), arg("initrd"))
}

/// A Linux x86 boot image: the boot sector signature and the `HdrS`
/// header of the boot protocol.
fn is_bzimage(b: &[u8]) -> bool {
    b.len() > 0x206 && b[0x1fe..0x200] == [0x55, 0xaa] && &b[0x202..0x206] == b"HdrS"
}

/// An initramfs: a newc cpio archive (possibly an early one before the
/// compressed main one) or a compressed one.
fn is_initramfs(b: &[u8]) -> bool {
    const MAGICS: &[&[u8]] = &[
        b"070701",
        b"070702",
        &[0x1f, 0x8b],
        &[0x28, 0xb5, 0x2f, 0xfd],
        &[0xfd, b'7', b'z', b'X', b'Z', 0],
        &[0x02, 0x21, 0x4c, 0x18],
        &[0x5d, 0, 0],
        b"BZh",
    ];
    b.len() > 512 && MAGICS.iter().any(|m| b.starts_with(m))
}

/// `path` (absolute) inside the image root `root`, every symlink followed
/// inside the root (absolute targets from the root, `..` stopping at it).
fn resolve_in(root: &Path, path: &Path) -> Result<PathBuf, String> {
    let mut todo: Vec<std::ffi::OsString> = path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut cur: Vec<std::ffi::OsString> = Vec::new();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        if c == ".." {
            cur.pop();
            continue;
        }
        let p = cur
            .iter()
            .fold(root.to_path_buf(), |p, c| p.join(c))
            .join(&c);
        let md = p
            .symlink_metadata()
            .map_err(|e| format!("{}: {e}", p.display()))?;
        if md.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return Err(format!("{}: too many links", path.display()));
            }
            let target = std::fs::read_link(&p).map_err(|e| e.to_string())?;
            if target.is_absolute() {
                cur.clear();
            }
            for t in target.components().rev() {
                match t {
                    Component::Normal(n) => todo.push(n.to_os_string()),
                    Component::ParentDir => todo.push("..".into()),
                    _ => {}
                }
            }
        } else {
            cur.push(c);
        }
    }
    Ok(cur.iter().fold(root.to_path_buf(), |p, c| p.join(c)))
}

fn recipe_file(recipe: &str, name: &str) -> Option<PathBuf> {
    let dir = default_images::recipe_dir(recipe);
    let common = dir.parent().expect("images/").join("common");
    [dir.join(name), common.join(name)]
        .into_iter()
        .find(|p| p.is_file())
}

#[test]
fn pc_x86_64_default_image_boots_a_node_over_tftp_and_nfs() {
    let img = default_images::default_image("pc-x86-64").unwrap();
    assert_eq!(img.refs().unwrap(), ["pc-x86-64-default"]);
    let bed = Bed::start(img);
    bed.check_node(&NodeCheck {
        model: "pc-x86-64",
        mac: "52:54:00:00:70:01",
        moved_ip: "192.168.152.71",
        script: "start.ipxe",
        recipe_script: Some(
            recipe_file("pc-x86-64", "start.ipxe").expect("the recipe has a start.ipxe"),
        ),
        root_files: &["/sbin/init", "/usr/sbin/sshd"],
    });

    // A user: the welcome call copies it under its preferred name, and a
    // clone of it from the registry is listed for the model.
    let alice = bed.server.cli("alice", &[]);
    let out = alice.run(&["image", "show"]);
    out.assert_success();
    assert!(
        out.stderr.contains("Cloned pc-x86-64-default")
            && out.stderr.contains(", a default image for pc-x86-64."),
        "{out}"
    );
    alice.clone_ok(&["local:waltplatform/pc-x86-64-default:latest", "mypc"]);
    for name in ["pc-x86-64-default", "mypc"] {
        let row = alice
            .show_row(name)
            .unwrap_or_else(|| panic!("walt image show does not list {name}"));
        assert_eq!(
            walt_e2e::store::table_cells(&row)
                .last()
                .map(String::as_str),
            Some("pc-x86-64"),
            "{row}"
        );
    }
}

/// The test of a cached recipe (`tests/run` runs it when the layout is
/// there): each of `models` (with its boot script) boots a node.
fn cached_recipe(recipe: &str, models: &[(&str, &str)]) {
    let img = default_images::cached(recipe).unwrap().unwrap_or_else(|| {
        panic!(
            "the {recipe} default image is not cached for the current recipe \
             (build it: target/debug/walt-e2e-default-image build {recipe})"
        )
    });
    check_models(img, recipe, models, &["/sbin/init", "/usr/sbin/sshd"]);
}

fn check_models(img: DefaultImage, recipe: &str, models: &[(&str, &str)], root_files: &[&str]) {
    let refs = img.refs().unwrap();
    for (model, _) in models {
        assert!(
            refs.contains(&format!("{model}-default")),
            "{}: no {model}-default in {refs:?}",
            img.layout.display()
        );
    }
    let bed = Bed::start(img);
    let macs: Vec<String> = (0..models.len())
        .map(|i| format!("52:54:00:00:71:{i:02x}"))
        .collect();
    let ips: Vec<String> = (0..models.len())
        .map(|i| format!("192.168.152.{}", 80 + i))
        .collect();
    for (i, (model, script)) in models.iter().enumerate() {
        bed.check_node(&NodeCheck {
            model,
            mac: &macs[i],
            moved_ip: &ips[i],
            script,
            recipe_script: recipe_file(recipe, script),
            root_files,
        });
    }
}

#[test]
#[ignore = "run by tests/run when the pc-x86-32 default image is cached"]
fn cached_pc_x86_32() {
    cached_recipe("pc-x86-32", &[("pc-x86-32", "start.ipxe")]);
}

#[test]
#[ignore = "run by tests/run when the rpi default image is cached"]
fn cached_rpi() {
    // arm64 for a Pi 4, arm/v7 for a Pi 2, from one index.
    cached_recipe(
        "rpi",
        &[("rpi-4-b", "start.uboot"), ("rpi-2-b", "start.uboot")],
    );
}

/// The check of an rpi index, on a fake one (busybox images for arm64 and
/// arm/v7 with different boot scripts) saved as a layout the way the cache
/// saves a built one: each model gets its platform's image.
#[test]
fn an_rpi_index_gives_each_model_its_platform_s_boot_files() {
    let images = ImageBuilder::new().unwrap();
    let models = "rpi-2-b,rpi-3-b,rpi-4-b";
    let arch = |config: ImageConfig, marker: &str| {
        let base = images
            .busybox_layer(Format::Oci, Compression::Gzip, marker)
            .unwrap();
        let mut entries = vec![RawEntry::dir("boot/")];
        for m in ["rpi-2-b", "rpi-3-b", "rpi-4-b"] {
            entries.push(RawEntry::dir(&format!("boot/{m}/")));
            entries.push(RawEntry::file(
                &format!("boot/{m}/start.uboot"),
                format!("echo {marker} {m}\n").as_bytes(),
            ));
        }
        let boot = images
            .layer(Format::Oci, Compression::Gzip, &entries)
            .unwrap();
        images.image(Format::Oci, config, &[base, boot]).unwrap()
    };
    let arm64 = arch(ImageConfig::arm64(models), "arm64");
    let armv7 = arch(ImageConfig::armv7(models), "armv7");
    let index = images
        .index(Format::Oci, &[arm64.clone(), armv7.clone()])
        .unwrap();
    let reg = Registry::start(RegistryOpts::plain()).unwrap();
    let repos: Vec<String> = ["rpi-2-b", "rpi-4-b"]
        .iter()
        .map(|m| format!("waltplatform/{m}-default"))
        .collect();
    for r in &repos {
        reg.client().push_index(r, "latest", &index).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("rpi");
    default_images::save_layout(&reg.host_port(), &repos, &layout).unwrap();
    drop(reg);
    let img = DefaultImage {
        recipe: "rpi".into(),
        key: "fake".into(),
        layout,
    };
    assert_eq!(img.refs().unwrap(), ["rpi-2-b-default", "rpi-4-b-default"]);
    // Same digests as pushed.
    assert_eq!(
        img.descriptor("rpi-4-b-default").unwrap()["digest"],
        index.digest.as_str()
    );
    let bed = Bed::start(img);
    assert_eq!(bed.expected_manifest("rpi-4-b"), arm64.manifest_digest);
    assert_eq!(bed.expected_manifest("rpi-2-b"), armv7.manifest_digest);
    let a = bed.check_node(&NodeCheck {
        model: "rpi-4-b",
        mac: "dc:a6:32:00:72:01",
        moved_ip: "192.168.152.91",
        script: "start.uboot",
        recipe_script: None,
        root_files: &["/bin/busybox"],
    });
    let b = bed.check_node(&NodeCheck {
        model: "rpi-2-b",
        mac: "b8:27:eb:00:72:02",
        moved_ip: "192.168.152.92",
        script: "start.uboot",
        recipe_script: None,
        root_files: &["/bin/busybox"],
    });
    assert_eq!(a, arm64.manifest_digest.strip_prefix("sha256:").unwrap());
    assert_eq!(b, armv7.manifest_digest.strip_prefix("sha256:").unwrap());
    // Each got its own platform's boot script.
    for (id, marker, m) in [(&a, "arm64", "rpi-4-b"), (&b, "armv7", "rpi-2-b")] {
        let p = bed
            .data()
            .join("images")
            .join(id)
            .join(format!("fs/boot/{m}/start.uboot"));
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            format!("echo {marker} {m}\n")
        );
    }
}

/// The cache key follows every input of a recipe (build.sh, the recipe's
/// files, names and modes, images/common) and nothing else.
#[test]
fn the_default_image_key_follows_the_recipe_inputs() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let images = d.path();
    let r = images.join("x-default");
    std::fs::create_dir_all(r.join("files")).unwrap();
    std::fs::write(images.join("build.sh"), "build\n").unwrap();
    std::fs::write(r.join("rootfs.sh"), "rootfs\n").unwrap();
    std::fs::write(r.join("files/a"), "a\n").unwrap();
    let key = || default_images::recipe_key_in(images, "x").unwrap();
    let k0 = key();
    assert_eq!(k0.len(), 16);
    assert_eq!(key(), k0, "stable");
    // Another recipe beside it changes nothing.
    std::fs::create_dir_all(images.join("y-default")).unwrap();
    std::fs::write(images.join("y-default/rootfs.sh"), "other\n").unwrap();
    assert_eq!(key(), k0);
    let mut seen = vec![k0];
    let mut changed = |what: &str| {
        let k = key();
        assert!(!seen.contains(&k), "{what}: the key did not change");
        seen.push(k);
    };
    std::fs::write(r.join("files/a"), "b\n").unwrap();
    changed("a file's contents");
    std::fs::rename(r.join("files/a"), r.join("files/c")).unwrap();
    changed("a file's name");
    std::fs::set_permissions(r.join("files/c"), std::fs::Permissions::from_mode(0o755)).unwrap();
    changed("a file's mode");
    std::os::unix::fs::symlink("c", r.join("files/l")).unwrap();
    changed("a new symlink");
    std::fs::write(images.join("build.sh"), "build 2\n").unwrap();
    changed("build.sh");
    std::fs::create_dir_all(images.join("common")).unwrap();
    std::fs::write(images.join("common/z"), "z\n").unwrap();
    changed("images/common");
}
