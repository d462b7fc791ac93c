//! Serving images to nodes: the image a node boots is mounted (overlay,
//! read-only, exportable) with its tree of links, a real tftpd-hpa serves
//! its boot files through walt's remap file, a real nfs-ganesha exports
//! what walt's exports file lists; unused mounts go after the grace period;
//! a restart (also after kill -9) restores the mounts and leaves no stale
//! one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use walt_e2e::netserve::{Ganesha, Tftpd, exports_entries, mounts_below};
use walt_e2e::util::wait_for;
use walt_e2e::{Compression, Format, ImageBuilder, ImageConfig, RawEntry, Registry, RegistryOpts};
use walt_e2e::{Walt, WaltServer};

const MODEL: &str = "pc-x86-64";

struct Bed {
    local: Registry,
    images: ImageBuilder,
    server: WaltServer,
    alice: Walt,
}

impl Bed {
    fn start(grace: &str) -> Self {
        let local = Registry::start(RegistryOpts::plain()).unwrap();
        let config = format!(
            "network:\n  walt-net:\n    ip: 192.168.152.1/24\nregistries:\n{}nodes:\n  unmount-grace: {grace}\n",
            local.server_entry("local")
        );
        let server = WaltServer::start_with_config(&config).unwrap();
        let alice = server.cli("alice", &[]);
        Bed {
            local,
            images: ImageBuilder::new().unwrap(),
            server,
            alice,
        }
    }

    fn data(&self) -> PathBuf {
        self.server.data_dir()
    }

    /// A busybox image with `/boot/<model>/start.ipxe` saying `marker`,
    /// pushed as `repo:latest`. Returns the manifest digest's hex (the
    /// mount id).
    fn push(&self, repo: &str, marker: &str) -> String {
        self.push_with(repo, marker, &[])
    }

    /// [`Bed::push`] with more entries in the boot layer.
    fn push_with(&self, repo: &str, marker: &str, extra: &[RawEntry]) -> String {
        let base = self
            .images
            .busybox_layer(Format::Oci, Compression::Gzip, marker)
            .unwrap();
        let mut entries = vec![
            RawEntry::dir("boot/"),
            RawEntry::dir(&format!("boot/{MODEL}/")),
            RawEntry::file(&format!("boot/{MODEL}/start.ipxe"), ipxe(marker).as_bytes()),
        ];
        entries.extend_from_slice(extra);
        let boot = self
            .images
            .layer(Format::Oci, Compression::Gzip, &entries)
            .unwrap();
        let img = self
            .images
            .image(Format::Oci, ImageConfig::amd64(MODEL), &[base, boot])
            .unwrap();
        self.local
            .client()
            .push_image(repo, "latest", &img)
            .unwrap();
        img.manifest_digest
            .strip_prefix("sha256:")
            .unwrap()
            .to_string()
    }

    /// [`Bed::push`], then cloned by alice as `name`.
    fn image(&self, repo: &str, name: &str, marker: &str) -> String {
        let id = self.push(repo, marker);
        self.alice
            .clone_ok(&[&format!("local:{repo}:latest"), name]);
        id
    }

    fn db(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(self.data().join("walt.db")).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c
    }

    fn device_row(&self, mac: &str) -> Option<(String, Option<String>, String)> {
        self.db()
            .query_row(
                "SELECT type, reason, name FROM devices WHERE mac = ?1",
                [mac],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .ok()
    }

    fn lease(&self, mac: &str, ip: &str) {
        self.server
            .dhcp_event(&[
                "commit",
                &format!("walt.node.{MODEL}"),
                "",
                ip,
                mac,
                "",
                "0",
                "unknown",
            ])
            .assert_success();
    }

    /// A node of MODEL at `ip` booting alice's `image`, through the DHCP
    /// hook. Until the default image fetch exists, the device the hook
    /// recorded (unknown, with the reason) is made a node in the database
    /// and a second lease makes the server catch up.
    fn node(&self, mac: &str, ip: &str, image: &str) -> String {
        self.lease(mac, ip);
        let (kind, _, name) = wait_for(
            "the device to be recorded as a node or with a reason",
            Duration::from_secs(30),
            || {
                self.device_row(mac)
                    .filter(|(kind, reason, _)| kind == "node" || reason.is_some())
            },
        )
        .unwrap();
        if kind != "node" {
            self.set_image(mac, image, true);
        }
        name
    }

    /// Makes the node boot alice's `image` (in the database), then a lease
    /// tells the server.
    fn set_image(&self, mac: &str, image: &str, make_node: bool) {
        let db = self.db();
        if make_node {
            db.execute(
                "UPDATE devices SET type = 'node', reason = NULL WHERE mac = ?1",
                [mac],
            )
            .unwrap();
        }
        let n = db
            .execute(
                "INSERT OR REPLACE INTO nodes (mac, model, image_id)
                 SELECT ?1, ?2, id FROM images WHERE owner = 'alice' AND name = ?3 AND tag = 'latest'",
                [mac, MODEL, image],
            )
            .unwrap();
        assert_eq!(n, 1, "image alice/{image} not in the store");
        let ip: String = db
            .query_row("SELECT ip FROM devices WHERE mac = ?1", [mac], |r| r.get(0))
            .unwrap();
        drop(db);
        self.lease(mac, &ip);
    }

    /// Waits until the node's boot file, through its tree, reads `marker`.
    fn wait_serving(&self, ip: &str, marker: &str) {
        let f = self.data().join("nodes").join(ip).join("tftp/start.ipxe");
        wait_for(
            &format!("{} to read {marker}", f.display()),
            Duration::from_secs(30),
            || (std::fs::read_to_string(&f).ok()? == ipxe(marker)).then_some(()),
        )
        .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", self.server.log()));
    }

    fn mounts(&self) -> Vec<PathBuf> {
        mounts_below(&self.data().join("images"))
    }

    /// The binds in the TFTP root.
    fn tftp_mounts(&self) -> Vec<PathBuf> {
        mounts_below(&tftp_root(&self.data()))
    }

    fn mount_point(&self, id: &str) -> PathBuf {
        self.data()
            .join("images")
            .join(id)
            .join("fs")
            .canonicalize()
            .unwrap()
    }
}

fn ipxe(marker: &str) -> String {
    format!("#!ipxe\necho {marker}\n")
}

fn link(p: &Path) -> PathBuf {
    std::fs::read_link(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn a_node_boots_over_tftp_and_nfs_from_its_mounted_image() {
    let bed = Bed::start("60s");
    let id = bed.image("waltplatform/pc-x86-64-default", "pcdef", "image-a");
    let mac = "52:54:00:00:00:01";
    // The tftp client runs here: the node's address is 127.0.0.1.
    let name = bed.node(mac, "127.0.0.1", "pcdef");
    bed.wait_serving("127.0.0.1", "image-a");
    let data = bed.data();
    let nodes = data.join("nodes");

    // The tree.
    assert_eq!(
        link(&nodes.join(mac).join("fs")),
        PathBuf::from(format!("../../images/{id}/fs"))
    );
    assert_eq!(
        link(&nodes.join(mac).join("tftp")),
        PathBuf::from(format!("../../images/{id}/fs/boot/{MODEL}"))
    );
    for alias in ["127.0.0.1", "52-54-00-00-00-01", name.as_str()] {
        assert_eq!(link(&nodes.join(alias)), PathBuf::from(mac), "{alias}");
    }
    assert_eq!(
        link(&nodes.join("192.168.152.20")),
        PathBuf::from("probing")
    );
    assert_eq!(bed.mounts(), vec![bed.mount_point(&id)]);
    // The mount shows the image, adapted, read-only.
    let fs = nodes.join("127.0.0.1/fs");
    assert!(fs.join("bin/busybox").is_file());
    let hosts = std::fs::read_to_string(fs.join("etc/hosts")).unwrap();
    assert!(hosts.starts_with("127.0.0.1   localhost\n"), "{hosts}");
    assert!(
        std::fs::read_to_string(fs.join("etc/resolv.conf"))
            .unwrap()
            .contains("nameserver 192.168.152.1\n")
    );
    assert!(std::fs::write(fs.join("etc/x"), "x").is_err(), "read-only");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mountinfo
        .lines()
        .find(|l| l.contains(&format!("/images/{id}/fs ")))
        .unwrap();
    assert!(
        line.contains(" ro,") && line.contains("nosuid") && line.contains("nodev"),
        "{line}"
    );
    assert!(
        line.contains("nfs_export=on") && line.contains("index=on"),
        "{line}"
    );

    // The exports file: the node trees and the mount, to the walt subnet.
    let exports = std::fs::read_to_string(bed.server.exports_file()).unwrap();
    let root = format!("{}/images/{id}/fs", data.display());
    assert!(
        exports.contains(&format!(
            "{root} 192.168.152.0/24(fsid={},ro,sync,no_root_squash,no_subtree_check)\n",
            &id[..32]
        )),
        "{exports}"
    );
    assert!(
        exports.contains(&format!(
            "{}/nodes 192.168.152.0/24(ro,sync,no_root_squash,no_subtree_check)\n",
            data.display()
        )),
        "{exports}"
    );
    // The remap file: relative to the TFTP root.
    let map = std::fs::read_to_string(bed.server.tftp_map_file()).unwrap();
    assert!(map.contains("\nr ^/?(.*) nodes/\\i/tftp/\\1\n"), "{map}");
    // The TFTP root: the node trees and the mount, read-only binds.
    assert_eq!(bed.tftp_mounts().len(), 2, "{:?}", bed.tftp_mounts());
    assert_eq!(
        std::fs::read_to_string(
            tftp_root(&data).join(format!("images/{id}/fs/boot/{MODEL}/start.ipxe"))
        )
        .unwrap(),
        ipxe("image-a")
    );

    // A real tftpd-hpa with that map: the node gets its image's boot file.
    let tftpd = Tftpd::start(&bed.server.tftp_map_file(), &tftp_root(&data)).unwrap();
    assert_eq!(tftpd.get("start.ipxe").unwrap(), ipxe("image-a").as_bytes());
    assert_eq!(
        tftpd.get("/start.ipxe").unwrap(),
        ipxe("image-a").as_bytes()
    );
    assert!(tftpd.get("missing.ipxe").is_err());

    // A real nfs-ganesha exporting what the exports file lists: the node
    // lists and reads its root.
    let paths: Vec<PathBuf> = exports_entries(&exports)
        .into_iter()
        .filter(|(_, fsid)| fsid.is_some())
        .map(|(p, _)| p)
        .collect();
    assert_eq!(paths, vec![PathBuf::from(&root)]);
    let nfs = Ganesha::start(&paths).unwrap();
    let names = nfs.ls(&root).unwrap();
    for n in ["bin", "boot", "etc"] {
        assert!(names.iter().any(|x| x == n), "{n} not in {names:?}");
    }
    assert_eq!(
        nfs.cat(&format!("{root}/boot/{MODEL}/start.ipxe")).unwrap(),
        ipxe("image-a").as_bytes()
    );
    assert_eq!(
        String::from_utf8(nfs.cat(&format!("{root}/etc/hosts")).unwrap()).unwrap(),
        hosts
    );
}

#[test]
fn an_unused_image_is_unmounted_after_the_grace_period() {
    let bed = Bed::start("2s");
    let a = bed.image("walt-e2e/a", "img-a", "image-a");
    let b = bed.image("walt-e2e/b", "img-b", "image-b");
    let mac = "52:54:00:00:00:02";
    let name = bed.node(mac, "192.168.152.12", "img-a");
    bed.wait_serving("192.168.152.12", "image-a");
    assert_eq!(bed.mounts(), vec![bed.mount_point(&a)]);
    let before = bed.server.log().matches("node serving ready").count();
    bed.alice
        .run(&["node", "boot", "--yes", &name, "img-b"])
        .assert_success();
    bed.wait_serving("192.168.152.12", "image-b");
    // The reconcile that switched the node kept the old mount (grace).
    bed.server
        .wait_log("node serving ready", before + 1)
        .unwrap();
    let log = bed.server.log();
    let first = log
        .lines()
        .filter(|l| l.contains("node serving ready"))
        .nth(before)
        .unwrap();
    assert!(first.contains("mounts=2 nodes=1 released=0"), "{first}");
    // Then it goes, with its export and its directory.
    let released = |id: &str, kept: &str| {
        let dir = bed.data().join("images").join(id);
        wait_for(
            &format!("{id} to be released"),
            Duration::from_secs(30),
            || (bed.mounts() == vec![bed.mount_point(kept)] && !dir.exists()).then_some(()),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", bed.server.log()));
        let exports = std::fs::read_to_string(bed.server.exports_file()).unwrap();
        assert!(!exports.contains(id) && exports.contains(kept), "{exports}");
    };
    released(&a, &b);
    bed.server
        .wait_log("image unmounted: no node uses it", 1)
        .unwrap();

    // New content under the node's image name: a new mount, the node
    // follows, the old content goes after the grace period.
    let c = bed.push("walt-e2e/c", "image-c");
    bed.alice
        .clone_ok(&["--force", "local:walt-e2e/c:latest", "img-b"]);
    bed.wait_serving("192.168.152.12", "image-c");
    released(&b, &c);
}

#[test]
fn a_restart_restores_the_mounts_and_kill_9_leaves_no_stale_one() {
    let mut bed = Bed::start("60s");
    let id = bed.image("walt-e2e/r", "img-r", "image-r");
    bed.node("52:54:00:00:00:03", "192.168.152.13", "img-r");
    bed.wait_serving("192.168.152.13", "image-r");

    // A clean stop releases everything.
    bed.server.stop();
    assert!(bed.mounts().is_empty(), "{:?}", bed.mounts());
    assert!(bed.tftp_mounts().is_empty(), "{:?}", bed.tftp_mounts());
    assert!(!bed.server.exports_file().exists());
    bed.server.restart().unwrap();
    bed.wait_serving("192.168.152.13", "image-r");
    assert_eq!(bed.mounts(), vec![bed.mount_point(&id)]);

    // kill -9 with the mount in use: the next start detaches it and mounts
    // afresh.
    let busy = std::fs::File::open(bed.data().join("nodes/192.168.152.13/fs/etc/hosts")).unwrap();
    bed.server.kill9();
    assert_eq!(bed.mounts().len(), 1, "left behind by kill -9");
    let ready = bed.server.log().matches("node serving ready").count();
    bed.server.restart().unwrap();
    bed.server
        .wait_log("unmounted a node mount left by a previous process", 1)
        .unwrap();
    bed.server
        .wait_log("node serving ready", ready + 1)
        .unwrap();
    // One mount there, the new one (not stacked on the stale one).
    assert_eq!(bed.mounts(), vec![bed.mount_point(&id)]);
    let mut binds = bed.tftp_mounts();
    binds.sort();
    let root = tftp_root(&bed.data()).canonicalize().unwrap();
    assert_eq!(
        binds,
        vec![root.join("images").join(&id).join("fs"), root.join("nodes")]
    );
    bed.wait_serving("192.168.152.13", "image-r");
    drop(busy);
    let exports = std::fs::read_to_string(bed.server.exports_file()).unwrap();
    assert!(exports.contains(&id), "{exports}");
}

/// The directory tftpd-hpa is chrooted in (`-s`).
fn tftp_root(data: &Path) -> PathBuf {
    data.join("tftp-root")
}

#[test]
fn tftp_never_reads_host_files_through_an_image_s_symlinks() {
    // A host file no node may read, with a secret content.
    let secret = format!("walt-secret-{}", std::process::id());
    let mut canary = tempfile::Builder::new()
        .prefix("walt-tftp-canary-")
        .tempfile_in("/etc")
        .unwrap();
    std::io::Write::write_all(&mut canary, secret.as_bytes()).unwrap();
    // World-readable: tftpd-hpa serves no other file.
    std::fs::set_permissions(
        canary.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let name = canary
        .path()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let host = format!("/etc/{name}");
    assert_eq!(std::fs::read_to_string(&host).unwrap(), secret);

    let bed = Bed::start("60s");
    // esc1 stays in the image up to /etc/y, an absolute link (outside
    // /boot, which walt leaves as it is); esc2 climbs above the root; esc3
    // is absolute.
    let id = bed.push_with(
        "walt-e2e/escape",
        "image-esc",
        &[
            RawEntry::dir("etc/"),
            RawEntry::symlink("etc/y", &host),
            RawEntry::symlink(&format!("boot/{MODEL}/esc1"), "../../etc/y"),
            RawEntry::symlink(
                &format!("boot/{MODEL}/esc2"),
                &format!("../../../../../../../..{host}"),
            ),
            RawEntry::symlink(&format!("boot/{MODEL}/esc3"), &host),
            // tftpd-hpa accepts writes to existing world-writable files.
            RawEntry::File {
                path: format!("boot/{MODEL}/writable"),
                data: b"as built".to_vec(),
                mode: 0o666,
            },
        ],
    );
    bed.alice
        .clone_ok(&["local:walt-e2e/escape:latest", "escape"]);
    bed.node("52:54:00:00:00:04", "127.0.0.1", "escape");
    bed.wait_serving("127.0.0.1", "image-esc");
    assert_eq!(bed.mounts(), vec![bed.mount_point(&id)]);

    let data = bed.data();
    let tftpd = Tftpd::start(&bed.server.tftp_map_file(), &tftp_root(&data)).unwrap();
    assert_eq!(
        tftpd.get("start.ipxe").unwrap(),
        ipxe("image-esc").as_bytes()
    );
    for remote in [
        "esc1".to_string(),
        "esc2".to_string(),
        "esc3".to_string(),
        format!("../../../../../../../..{host}"),
        host.clone(),
    ] {
        if let Ok(got) = tftpd.get(&remote) {
            let got = String::from_utf8_lossy(&got);
            assert!(
                !got.contains(&secret),
                "a TFTP request for {remote} read the host's {host}"
            );
        }
    }
    // Nodes read, never write.
    assert_eq!(tftpd.get("writable").unwrap(), b"as built");
    assert!(tftpd.put("writable", b"changed").is_err());
    assert_eq!(tftpd.get("writable").unwrap(), b"as built");
    drop(canary);
}
