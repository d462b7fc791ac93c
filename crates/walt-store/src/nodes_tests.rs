//! Tests of the device and node records.

use walt_core::ImageName;

use crate::tests::new_store;
use crate::*;

fn name(owner: &str, n: &str) -> ImageName {
    ImageName {
        owner: owner.into(),
        name: n.into(),
        tag: "latest".into(),
    }
}

/// An empty image (no layer) recorded as `img`.
fn image(store: &Store, img: &ImageName) {
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "created": "2026-12-01T00:00:00Z",
        "config": { "Labels": { "walt.node.models": "pc-x86-64" } },
        "rootfs": { "type": "layers", "diff_ids": [] },
    });
    let serde_json::Value::Object(config) = config else {
        unreachable!()
    };
    store
        .record_built_image(img, config, vec![], vec!["pc-x86-64".into()], false, 1)
        .unwrap();
}

fn lease(mac: &str, ip: &str, host: &str, model: Option<&str>) -> Lease {
    Lease {
        mac: mac.into(),
        ip: ip.into(),
        hostname: host.into(),
        model: model.map(str::to_string),
        now: 1_700_000_000,
    }
}

#[test]
fn leases_record_devices_with_unique_names() {
    let (_d, store) = new_store();
    let (a, new) = store
        .record_lease(&lease(
            "52:54:00:12:34:56",
            "10.0.0.5",
            "",
            Some("pc-x86-64"),
        ))
        .unwrap();
    assert!(new);
    assert_eq!(a.name, "pc-x86-64-123456");
    assert_eq!(a.kind, DeviceKind::Unknown);
    assert_eq!(a.model.as_deref(), Some("pc-x86-64"));
    // Same suffix, other MAC: the name gets -2.
    let (b, _) = store
        .record_lease(&lease(
            "52:54:01:12:34:56",
            "10.0.0.6",
            "",
            Some("pc-x86-64"),
        ))
        .unwrap();
    assert_eq!(b.name, "pc-x86-64-123456-2");
    // A known device: new address, name kept; the address leaves the other.
    let (a2, new) = store
        .record_lease(&lease("52:54:00:12:34:56", "10.0.0.6", "other", None))
        .unwrap();
    assert!(!new);
    assert_eq!(a2.name, "pc-x86-64-123456");
    assert_eq!(a2.ip.as_deref(), Some("10.0.0.6"));
    assert_eq!(a2.model.as_deref(), Some("pc-x86-64"));
    let b2 = store.find_device("pc-x86-64-123456-2").unwrap().unwrap();
    assert_eq!(b2.ip, None);
    // Found by MAC in another spelling, and by address.
    assert_eq!(
        store
            .find_device("52-54-00-12-34-56")
            .unwrap()
            .unwrap()
            .name,
        a.name
    );
    assert_eq!(store.find_device("10.0.0.6").unwrap().unwrap().name, a.name);
    assert!(store.find_device("nope").unwrap().is_none());
}

#[test]
fn nodes_use_images_and_follow_them() {
    let (_d, store) = new_store();
    let default = name("waltplatform", "pc-x86-64-default");
    image(&store, &default);
    let mac = "52:54:00:12:34:56";
    store
        .record_lease(&lease(mac, "10.0.0.5", "", Some("pc-x86-64")))
        .unwrap();
    store
        .set_unknown_reason(mac, "no default image yet")
        .unwrap();
    assert_eq!(
        store.find_device(mac).unwrap().unwrap().reason.as_deref(),
        Some("no default image yet")
    );
    assert!(!store.image_in_use(&default).unwrap());
    assert!(store.make_node(mac, "pc-x86-64", &default).unwrap());
    assert!(!store.make_node(mac, "pc-x86-64", &default).unwrap());
    let n = store.find_device(mac).unwrap().unwrap();
    assert_eq!(n.kind, DeviceKind::Node);
    assert_eq!(n.reason, None);
    assert_eq!(n.image.as_ref(), Some(&default));
    assert!(store.image_in_use(&default).unwrap());
    assert_eq!(store.node_models().unwrap(), vec!["pc-x86-64".to_string()]);
    // A reason cannot turn a node back.
    store.set_unknown_reason(mac, "x").unwrap();
    assert_eq!(store.find_device(mac).unwrap().unwrap().reason, None);

    // Boot another image; a replaced image keeps its nodes.
    let mine = name("alice", "img");
    image(&store, &mine);
    store.set_nodes_image(&[mac.to_string()], &mine).unwrap();
    assert!(!store.image_in_use(&default).unwrap());
    assert_eq!(store.nodes_using(&mine).unwrap().len(), 1);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "created": "2026-12-02T00:00:00Z",
        "rootfs": { "type": "layers", "diff_ids": [] },
    });
    let serde_json::Value::Object(config) = config else {
        unreachable!()
    };
    store
        .record_built_image(&mine, config, vec![], vec!["pc-x86-64".into()], true, 2)
        .unwrap();
    assert_eq!(store.nodes_using(&mine).unwrap().len(), 1);
    // The store refuses to drop an image nodes use.
    assert!(store.remove_image(&mine).is_err());
    assert!(
        store
            .set_nodes_image(&["00:00:00:00:00:01".into()], &mine)
            .is_err()
    );

    // Renames.
    store.rename_device("pc-x86-64-123456", "bench-1").unwrap();
    assert_eq!(store.find_device(mac).unwrap().unwrap().name, "bench-1");
    store
        .record_lease(&lease("52:54:00:00:00:01", "10.0.0.7", "", None))
        .unwrap();
    assert!(matches!(
        store.rename_device("unknown-000001", "bench-1"),
        Err(StoreError::DeviceExists(_))
    ));
    assert!(matches!(
        store.rename_device("ghost", "x"),
        Err(StoreError::DeviceNotFound(_))
    ));
}

#[test]
fn default_copies_are_given_once() {
    let (_d, store) = new_store();
    let d = name("waltplatform", "rpi-b-default");
    assert!(!store.default_copy_given("alice", &d).unwrap());
    store.record_default_copy("alice", &d).unwrap();
    store.record_default_copy("alice", &d).unwrap();
    assert!(store.default_copy_given("alice", &d).unwrap());
    assert!(!store.default_copy_given("bob", &d).unwrap());
}

#[test]
fn devices_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(&dir.path().join("data")).unwrap();
        store
            .record_lease(&lease("b8:27:eb:01:02:03", "10.0.0.9", "pi", None))
            .unwrap();
    }
    let store = Store::open(&dir.path().join("data")).unwrap();
    let all = store.list_devices().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].name, "pi-010203");
}

#[test]
fn the_devices_waiting_for_a_model_become_nodes_at_once() {
    let (_d, store) = new_store();
    let default = name("waltplatform", "pc-x86-64-default");
    image(&store, &default);
    for i in 1..=3 {
        store
            .record_lease(&lease(
                &format!("52:54:00:00:00:0{i}"),
                &format!("10.0.0.{i}"),
                "",
                Some("pc-x86-64"),
            ))
            .unwrap();
    }
    store
        .record_lease(&lease("52:54:00:00:00:09", "10.0.0.9", "", Some("rpi-b")))
        .unwrap();
    store
        .record_lease(&lease("52:54:00:00:00:08", "10.0.0.8", "", None))
        .unwrap();
    let made = store.make_nodes_of_model("pc-x86-64", &default).unwrap();
    assert_eq!(made.len(), 3);
    assert_eq!(store.nodes_using(&default).unwrap().len(), 3);
    let rpi = store.find_device("52:54:00:00:00:09").unwrap().unwrap();
    assert_eq!(rpi.kind, DeviceKind::Unknown);
    assert!(
        store
            .make_nodes_of_model("pc-x86-64", &default)
            .unwrap()
            .is_empty()
    );
}

fn vconf() -> VnodeConf {
    VnodeConf {
        cpu_cores: 4,
        ram_mb: 512,
        disks: "none".into(),
    }
}

#[test]
fn virtual_nodes_are_recorded_configured_and_removed() {
    let (_d, store) = new_store();
    let img = name("waltplatform", "pc-x86-64-default");
    image(&store, &img);
    let mac = "52:54:00:aa:bb:cc";
    let dev = store
        .create_vnode("vnode1", mac, "pc-x86-64", &img, &vconf(), 5)
        .unwrap();
    assert_eq!(dev.kind, DeviceKind::Node);
    assert_eq!(dev.image.as_ref(), Some(&img));
    assert_eq!(dev.ip, None);
    // Name or MAC taken: refused.
    assert!(matches!(
        store.create_vnode(
            "vnode1",
            "52:54:00:aa:bb:cd",
            "pc-x86-64",
            &img,
            &vconf(),
            5
        ),
        Err(StoreError::DeviceExists(_))
    ));
    assert!(matches!(
        store.create_vnode("vnode2", mac, "pc-x86-64", &img, &vconf(), 5),
        Err(StoreError::DeviceExists(_))
    ));
    // A lease of it only updates its address.
    let (d, new) = store
        .record_lease(&lease(mac, "10.0.0.9", "", None))
        .unwrap();
    assert!(!new);
    assert_eq!(d.kind, DeviceKind::Node);
    let conf = VnodeConf {
        cpu_cores: 2,
        ram_mb: 1024,
        disks: "8G".into(),
    };
    store.set_vnode_conf(mac, &conf).unwrap();
    let v = store.list_vnodes().unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].conf, conf);
    assert_eq!(v[0].device.ip.as_deref(), Some("10.0.0.9"));
    assert_eq!(store.get_vnode(mac).unwrap().unwrap().device.name, "vnode1");
    // Removed: no device, no node (the image is no longer in use).
    store.remove_vnode(mac).unwrap();
    assert!(store.list_vnodes().unwrap().is_empty());
    assert!(store.find_device("vnode1").unwrap().is_none());
    assert!(store.nodes_using(&img).unwrap().is_empty());
    assert!(matches!(
        store.remove_vnode(mac),
        Err(StoreError::DeviceNotFound(_))
    ));
}

#[test]
fn a_version_3_database_gets_the_vnodes_table() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let store = Store::open(&data).unwrap();
        store
            .record_lease(&lease("52:54:00:00:00:07", "10.0.0.7", "", None))
            .unwrap();
    }
    {
        let conn = rusqlite::Connection::open(data.join("walt.db")).unwrap();
        conn.execute_batch("DROP TABLE vnodes; PRAGMA user_version = 3;")
            .unwrap();
    }
    let store = Store::open(&data).unwrap();
    // The device of version 3 is still there; virtual nodes work.
    assert!(store.find_device("52:54:00:00:00:07").unwrap().is_some());
    assert!(store.list_vnodes().unwrap().is_empty());
    let img = name("waltplatform", "pc-x86-64-default");
    image(&store, &img);
    store
        .create_vnode("v", "52:54:00:00:00:08", "pc-x86-64", &img, &vconf(), 1)
        .unwrap();
    assert_eq!(store.list_vnodes().unwrap().len(), 1);
    let conn = rusqlite::Connection::open(data.join("walt.db")).unwrap();
    let v: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v, 4);
}
