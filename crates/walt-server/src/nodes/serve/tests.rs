//! Real overlay mounts (root): mounts, trees, exports, grace, restart.

use super::*;

use walt_core::ImageName;
use walt_core::oci::Compression;
use walt_store::Lease;
use walt_store::{ImportOptions, LayerRef, NewImage};

fn root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A layer tar of (path, content) files; directories are implied.
fn layer_tar(files: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append_data(&mut h, path, data.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

/// Records `name` made of these layers (lowest first); `salt` changes the
/// manifest (a new content under the same name).
fn put_image(store: &Store, name: &ImageName, layers: &[Vec<u8>], salt: &str, replace: bool) {
    let mut refs = Vec::new();
    for t in layers {
        let digest = Digest::from_sha256(sha256(t));
        let l = store
            .import_layer(
                &mut t.as_slice(),
                Compression::None,
                &digest,
                &ImportOptions::default(),
            )
            .unwrap();
        refs.push(LayerRef {
            diff_id: l.diff_id,
            blob_digest: l.digest,
            blob_size: l.size,
            media_type: walt_core::oci::OCI_LAYER_TAR.into(),
        });
    }
    let config = store
        .put_blob(None, format!("{{\"config\":\"{salt}\"}}").as_bytes())
        .unwrap();
    let manifest = store
        .put_blob(None, format!("{{\"manifest\":\"{config}\"}}").as_bytes())
        .unwrap();
    store
        .put_image(
            &NewImage {
                name: name.clone(),
                manifest_digest: manifest,
                manifest_media_type: walt_core::oci::OCI_MANIFEST.into(),
                config_digest: config,
                layers: refs,
                node_models: vec!["pc-x86-64".into()],
                created: 1_700_000_000,
            },
            replace,
        )
        .unwrap();
}

fn sha256(b: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(b).into()
}

fn config(text: &str) -> ServerConfig {
    ServerConfig::parse("t", text).unwrap()
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    serving: Serving,
    paths: NodePaths,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store = Store::open(&data).unwrap();
        let paths = NodePaths {
            data_dir: data.clone(),
            event_socket: None,
            exports_file: dir.path().join("exports.d/walt.exports"),
            tftp_map_file: data.join("tftp.map"),
        };
        Fixture {
            serving: Serving::new(&paths),
            store,
            paths,
            _dir: dir,
        }
    }

    fn node(&self, mac: &str, ip: &str, image: &ImageName) {
        self.store
            .record_lease(&Lease {
                mac: mac.into(),
                ip: ip.into(),
                hostname: String::new(),
                model: Some("pc-x86-64".into()),
                now: 1,
            })
            .unwrap();
        self.store.make_node(mac, "pc-x86-64", image).unwrap();
    }

    fn id(&self, name: &ImageName) -> String {
        self.store
            .get_image(name)
            .unwrap()
            .unwrap()
            .manifest_digest
            .hex()
            .to_string()
    }

    fn nodes(&self) -> PathBuf {
        self.paths.data_dir.join("nodes")
    }

    /// The image mounts.
    fn mounted(&self) -> Vec<PathBuf> {
        overlay::mounts_below(&self.paths.data_dir.join("images"))
    }

    /// The binds in the TFTP root.
    fn tftp_mounted(&self) -> Vec<PathBuf> {
        overlay::mounts_below(&self.serving.tftp_root())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for p in overlay::mounts_below(&self.paths.data_dir) {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// `owner/name:tag`.
fn img(s: &str) -> ImageName {
    let (owner, rest) = s.split_once('/').unwrap();
    let (name, tag) = rest.split_once(':').unwrap();
    ImageName {
        owner: owner.into(),
        name: name.into(),
        tag: tag.into(),
    }
}

#[test]
fn a_node_gets_its_image_mounted_with_links_exports_and_map() {
    assert!(
        root(),
        "this test mounts overlays: run it as root (CI does)"
    );
    let f = Fixture::new();
    let name = img("waltplatform/pc-x86-64-default:latest");
    put_image(
        &f.store,
        &name,
        &[
            layer_tar(&[
                ("boot/pc-x86-64/start.ipxe", "#!ipxe\nold\n"),
                ("etc/passwd", "root"),
            ]),
            layer_tar(&[("boot/pc-x86-64/start.ipxe", "#!ipxe\nboot\n")]),
        ],
        "a",
        false,
    );
    f.node("52:54:00:00:00:01", "192.168.152.10", &name);
    let conf = config("network:\n  walt-net:\n    ip: 192.168.152.1/24\n");
    let next = f.serving.reconcile(&f.store, &conf, Instant::now());
    assert_eq!(next, None);
    let id = f.id(&name);
    assert!(
        f.serving
            .is_mounted(&Digest::parse(&format!("sha256:{id}")).unwrap())
    );
    assert_eq!(
        f.mounted(),
        vec![f.serving.mount_point(&id).canonicalize().unwrap()]
    );
    let nodes = f.nodes();
    let mac_dir = nodes.join("52:54:00:00:00:01");
    assert_eq!(
        std::fs::read_link(mac_dir.join("fs")).unwrap(),
        PathBuf::from(format!("../../images/{id}/fs"))
    );
    assert_eq!(
        std::fs::read_link(mac_dir.join("tftp")).unwrap(),
        PathBuf::from(format!("../../images/{id}/fs/boot/pc-x86-64"))
    );
    for alias in ["192.168.152.10", "52-54-00-00-00-01", "pc-x86-64-000001"] {
        assert_eq!(
            std::fs::read_link(nodes.join(alias)).unwrap(),
            PathBuf::from("52:54:00:00:00:01"),
            "{alias}"
        );
    }
    // Through the alias, as tftpd and the NFS client go.
    assert_eq!(
        std::fs::read_to_string(nodes.join("192.168.152.10/tftp/start.ipxe")).unwrap(),
        "#!ipxe\nboot\n"
    );
    // The same in the TFTP root, where only the trees and the mount are.
    let troot = f.serving.tftp_root();
    assert_eq!(
        std::fs::read_to_string(troot.join("nodes/192.168.152.10/tftp/start.ipxe")).unwrap(),
        "#!ipxe\nboot\n"
    );
    let mut tm = f.tftp_mounted();
    tm.sort();
    assert_eq!(
        tm,
        vec![
            f.serving.tftp_mount_point(&id).canonicalize().unwrap(),
            troot.join("nodes").canonicalize().unwrap(),
        ]
    );
    let mut top: Vec<String> = std::fs::read_dir(&troot)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["images", "nodes"]);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&troot).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755);
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for p in &tm {
        let line = info
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()))
            .unwrap();
        assert!(
            line.contains(" ro,") && line.contains("nosuid") && line.contains("nodev"),
            "{line}"
        );
    }
    assert!(std::fs::write(troot.join("nodes/x"), "x").is_err());
    assert_eq!(
        std::fs::read_to_string(nodes.join("192.168.152.10/fs/etc/passwd")).unwrap(),
        "root"
    );
    // Adapted in the mount, not in the image; read-only.
    let hosts = nodes.join("192.168.152.10/fs/etc/hosts");
    assert!(
        std::fs::read_to_string(&hosts)
            .unwrap()
            .contains("localhost")
    );
    assert!(
        std::fs::read_to_string(nodes.join("192.168.152.10/fs/etc/resolv.conf"))
            .unwrap()
            .contains("nameserver 192.168.152.1")
    );
    assert!(std::fs::write(&hosts, "x").is_err());
    for l in f.store.get_image(&name).unwrap().unwrap().layers {
        assert!(!f.store.layer_path(&l.diff_id).join("etc/hosts").exists());
    }
    // Free addresses and the probing tree.
    assert_eq!(
        std::fs::read_link(nodes.join("192.168.152.11")).unwrap(),
        PathBuf::from(PROBING)
    );
    assert!(
        !nodes.join("192.168.152.1").exists(),
        "the server's own address"
    );
    assert!(nodes.join("probing/tftp").is_dir());
    let data = f.paths.data_dir.display().to_string();
    assert_eq!(
        std::fs::read_to_string(&f.paths.exports_file).unwrap(),
        format!(
            "{EXPORTS_HEADER}# Access to node symlinks (necessary for NFSv4).\n\
             {data}/nodes 192.168.152.0/24(ro,sync,no_root_squash,no_subtree_check)\n\
             # Root filesystem images\n\
             {data}/images/{id}/fs 192.168.152.0/24(fsid={},ro,sync,no_root_squash,no_subtree_check)\n",
            &id[..32]
        )
    );
    assert!(
        std::fs::read_to_string(&f.paths.tftp_map_file)
            .unwrap()
            .contains("\nr ^/?(.*) nodes/\\i/tftp/\\1\n")
    );
    let line = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.contains(&format!("images/{id}/fs")))
        .unwrap()
        .to_string();
    assert!(
        line.contains("nfs_export=on") && line.contains(" ro,"),
        "{line}"
    );

    // A second reconcile changes nothing and mounts nothing again.
    f.serving.reconcile(&f.store, &conf, Instant::now());
    assert_eq!(f.mounted().len(), 1);

    // At shutdown: nothing mounted, no exports.
    f.serving.release_all();
    assert!(f.mounted().is_empty());
    assert!(f.tftp_mounted().is_empty());
    assert!(!f.paths.exports_file.exists());
    assert!(!f.paths.data_dir.join("images").join(&id).exists());
    assert!(!troot.join("images").join(&id).exists());
    // The root stays (tftpd-hpa keeps its root directory from its start).
    assert!(troot.join("nodes").is_dir());
}

#[test]
fn replaced_and_unused_images_are_released_after_the_grace() {
    assert!(
        root(),
        "this test mounts overlays: run it as root (CI does)"
    );
    let f = Fixture::new();
    let name = img("alice/img:latest");
    put_image(&f.store, &name, &[layer_tar(&[("v", "1")])], "v1", false);
    f.node("52:54:00:00:00:02", "10.0.0.2", &name);
    let conf = config("nodes:\n  unmount-grace: 1h\n");
    let t0 = Instant::now();
    f.serving.reconcile(&f.store, &conf, t0);
    let old = f.id(&name);
    // New content under the same name: a new mount, the node follows.
    put_image(&f.store, &name, &[layer_tar(&[("v", "2")])], "v2", true);
    let new = f.id(&name);
    assert_ne!(old, new);
    let next = f.serving.reconcile(&f.store, &conf, t0);
    assert_eq!(next, Some(t0 + Duration::from_secs(3600)));
    assert_eq!(
        f.mounted().len(),
        2,
        "the old one stays for the grace period"
    );
    assert_eq!(
        std::fs::read_to_string(f.nodes().join("10.0.0.2/fs/v")).unwrap(),
        "2"
    );
    let exports = std::fs::read_to_string(&f.paths.exports_file).unwrap();
    assert!(
        exports.contains(&old) && exports.contains(&new),
        "{exports}"
    );
    assert!(
        exports.contains(" *(fsid="),
        "no walt-net: any client\n{exports}"
    );
    // Not yet...
    f.serving
        .reconcile(&f.store, &conf, t0 + Duration::from_secs(3599));
    assert_eq!(f.mounted().len(), 2);
    // ...now.
    let next = f
        .serving
        .reconcile(&f.store, &conf, t0 + Duration::from_secs(3600));
    assert_eq!(next, None);
    assert_eq!(
        f.mounted(),
        vec![f.serving.mount_point(&new).canonicalize().unwrap()]
    );
    assert!(
        !std::fs::read_to_string(&f.paths.exports_file)
            .unwrap()
            .contains(&old)
    );
    assert!(!f.paths.data_dir.join("images").join(&old).exists());
    assert_eq!(f.tftp_mounted().len(), 2, "{:?}", f.tftp_mounted());
    assert!(f.serving.tftp_mount_point(&new).join("v").is_file());
    assert!(!f.serving.tftp_root().join("images").join(&old).exists());
}

#[test]
fn a_restart_after_kill_cleans_stale_mounts_and_restores() {
    assert!(
        root(),
        "this test mounts overlays: run it as root (CI does)"
    );
    let f = Fixture::new();
    let name = img("alice/empty:latest");
    // An image without layers still mounts.
    put_image(&f.store, &name, &[], "empty", false);
    f.node("52:54:00:00:00:03", "10.0.0.3", &name);
    let conf = config("");
    f.serving.reconcile(&f.store, &conf, Instant::now());
    assert_eq!(f.mounted().len(), 1);
    // A stale node entry and a busy mount, as a killed server leaves them.
    std::fs::create_dir_all(f.nodes().join("aa:bb:cc:dd:ee:ff")).unwrap();
    let busy = std::fs::File::open(f.nodes().join("10.0.0.3/fs/etc/hosts")).unwrap();
    // A new process: it knows of no mount.
    let again = Serving::new(&f.paths);
    again.clean_stale();
    assert!(f.mounted().is_empty(), "busy: detached lazily");
    assert!(f.tftp_mounted().is_empty(), "{:?}", f.tftp_mounted());
    drop(busy);
    again.reconcile(&f.store, &conf, Instant::now());
    assert_eq!(f.mounted().len(), 1);
    assert_eq!(f.tftp_mounted().len(), 2, "{:?}", f.tftp_mounted());
    assert!(!f.nodes().join("aa:bb:cc:dd:ee:ff").exists());
    assert!(f.nodes().join("10.0.0.3/fs/etc/hosts").is_file());
    again.release_all();
}

#[test]
fn unknown_devices_point_to_the_probing_tree() {
    assert!(
        root(),
        "this test mounts overlays: run it as root (CI does)"
    );
    let f = Fixture::new();
    f.store
        .record_lease(&Lease {
            mac: "b8:27:eb:00:00:04".into(),
            ip: "10.0.0.4".into(),
            hostname: "../../etc".into(),
            model: None,
            now: 1,
        })
        .unwrap();
    f.serving.reconcile(&f.store, &config(""), Instant::now());
    let dir = f.nodes().join("b8:27:eb:00:00:04");
    assert_eq!(
        std::fs::read_link(dir.join("tftp")).unwrap(),
        PathBuf::from("../probing/tftp")
    );
    assert_eq!(
        std::fs::read_link(f.nodes().join("10.0.0.4")).unwrap(),
        PathBuf::from("b8:27:eb:00:00:04")
    );
    assert!(f.mounted().is_empty());
    // No image mounted: nothing bound in the TFTP root, its dirs are there.
    assert!(f.tftp_mounted().is_empty(), "{:?}", f.tftp_mounted());
    assert!(f.serving.tftp_root().join("nodes").is_dir());
    assert!(f.serving.tftp_root().join("images").is_dir());
    let exports = std::fs::read_to_string(&f.paths.exports_file).unwrap();
    assert_eq!(exports, EXPORTS_HEADER);
}

#[test]
fn text_of_the_files() {
    assert_eq!(
        tftp_map_text(),
        "# walt: each request maps into the tree of the client's address, in the TFTP root (in.tftpd -s).\n\
         r ^/?(.*) nodes/\\i/tftp/\\1\n"
    );
    let e = exports_text(
        Path::new("/d"),
        &["ab".repeat(32)],
        Some((Ipv4Addr::new(10, 1, 2, 3), 16)),
    );
    assert!(e.contains("/d/nodes 10.1.0.0/16(ro,"), "{e}");
    assert!(
        e.contains(&format!("fsid={},ro,sync", "ab".repeat(16))),
        "{e}"
    );
    assert!(is_safe_model("rpi-3-b-plus"));
    assert!(!is_safe_model("../x"));
    assert!(!is_safe_name("probing"));
    assert!(!is_safe_name(".."));
}

#[test]
fn stale_mounts_stacked_on_one_path_all_go() {
    assert!(
        root(),
        "this test mounts overlays: run it as root (CI does)"
    );
    let f = Fixture::new();
    let name = img("alice/stack:latest");
    put_image(&f.store, &name, &[layer_tar(&[("f", "x")])], "stack", false);
    f.node("52:54:00:00:00:05", "10.0.0.5", &name);
    let conf = config("");
    // Two processes that did not clean up mounted on the same path.
    f.serving.reconcile(&f.store, &conf, Instant::now());
    Serving::new(&f.paths).reconcile(&f.store, &conf, Instant::now());
    assert_eq!(f.mounted().len(), 2, "{:?}", f.mounted());
    assert_eq!(f.tftp_mounted().len(), 4, "{:?}", f.tftp_mounted());
    Serving::new(&f.paths).clean_stale();
    assert!(f.mounted().is_empty(), "{:?}", f.mounted());
    assert!(f.tftp_mounted().is_empty(), "{:?}", f.tftp_mounted());
}
