//! Devices seen on the walt network and the nodes among them.
//!
//! A device is recorded at its first DHCP lease (by MAC); it is `unknown`
//! until walt knows its model and has the model's default image, then it
//! is a node booting an image. A node refers to its image by the image's
//! row: replacing an image's content (`put_image` with `replace`) keeps
//! the row, so nodes follow the name; removing or renaming an image nodes
//! use is refused by the server before it reaches the store (and the
//! foreign key refuses the removal here too).

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use walt_core::ImageName;
use walt_core::models::default_device_name;

use crate::Store;
use crate::db::image_id;
use crate::error::{DbContext, Result, StoreError};

/// What a device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A node: it boots an image of the store.
    Node,
    /// Anything else (no model announced, or its default image could not
    /// be obtained yet).
    Unknown,
}

impl DeviceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Node => "node",
            DeviceKind::Unknown => "unknown",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "node" => DeviceKind::Node,
            _ => DeviceKind::Unknown,
        }
    }
}

/// A device as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Its last leased address, if no other device took it since.
    pub ip: Option<String>,
    pub name: String,
    pub kind: DeviceKind,
    /// The model it announced (kept while it is still `unknown`).
    pub model: Option<String>,
    /// Why an `unknown` device is not a node (for `walt device show`).
    pub reason: Option<String>,
    /// The image a node boots.
    pub image: Option<ImageName>,
    /// Unix seconds.
    pub first_seen: i64,
    pub last_seen: i64,
}

/// A DHCP lease commit, as the hook reports it (already validated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Normalised (`walt_core::models::normalize_mac`).
    pub mac: String,
    pub ip: String,
    /// The hostname the client sent (may be empty).
    pub hostname: String,
    /// The model announced in its classes.
    pub model: Option<String>,
    /// Unix seconds.
    pub now: i64,
}

const DEVICE_QUERY: &str =
    "SELECT d.mac, d.ip, d.name, d.type, d.model, d.reason, d.first_seen, d.last_seen,
        i.owner, i.name, i.tag, n.model
    FROM devices d LEFT JOIN nodes n ON n.mac = d.mac LEFT JOIN images i ON i.id = n.image_id";

fn read_device(r: &rusqlite::Row<'_>) -> rusqlite::Result<Device> {
    let owner: Option<String> = r.get(8)?;
    let image = match owner {
        Some(owner) => Some(ImageName {
            owner,
            name: r.get(9)?,
            tag: r.get(10)?,
        }),
        None => None,
    };
    let node_model: Option<String> = r.get(11)?;
    Ok(Device {
        mac: r.get(0)?,
        ip: r.get(1)?,
        name: r.get(2)?,
        kind: DeviceKind::parse(&r.get::<_, String>(3)?),
        model: node_model.or(r.get(4)?),
        reason: r.get(5)?,
        image,
        first_seen: r.get(6)?,
        last_seen: r.get(7)?,
    })
}

fn devices_where(conn: &Connection, cond: &str, p: impl rusqlite::Params) -> Result<Vec<Device>> {
    let ctx = "listing devices";
    let mut stmt = conn
        .prepare(&format!("{DEVICE_QUERY} {cond} ORDER BY d.name"))
        .db(ctx)?;
    let rows = stmt.query_map(p, read_device).db(ctx)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().db(ctx)
}

fn device_by_mac(conn: &Connection, mac: &str) -> Result<Option<Device>> {
    Ok(devices_where(conn, "WHERE d.mac = ?1", [mac])?
        .into_iter()
        .next())
}

fn name_taken(tx: &Transaction<'_>, name: &str) -> Result<bool> {
    tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM devices WHERE name = ?1)",
        [name],
        |r| r.get(0),
    )
    .db("checking a device name")
}

/// `base`, or `base-2`, `base-3`... : the first name no device has.
fn free_name(tx: &Transaction<'_>, base: &str) -> Result<String> {
    let mut i = 1;
    loop {
        let name = if i == 1 {
            base.to_string()
        } else {
            format!("{base}-{i}")
        };
        if !name_taken(tx, &name)? {
            return Ok(name);
        }
        i += 1;
    }
}

impl Store {
    /// Records a lease: a new device gets its default name (made unique)
    /// and type `unknown`; a known one gets the new address, the time and,
    /// when the lease announces one, the model. Another device recorded
    /// with the same address loses it. Returns the device as now recorded
    /// and whether it is new.
    pub fn record_lease(&self, lease: &Lease) -> Result<(Device, bool)> {
        let ctx = format!("recording the lease of {}", lease.mac);
        let mut conn = self.inner.conn();
        let tx = conn.transaction().db(&ctx)?;
        tx.execute(
            "UPDATE devices SET ip = NULL WHERE ip = ?1 AND mac != ?2",
            params![lease.ip, lease.mac],
        )
        .db(&ctx)?;
        let known: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM devices WHERE mac = ?1)",
                [&lease.mac],
                |r| r.get(0),
            )
            .db(&ctx)?;
        if known {
            tx.execute(
                "UPDATE devices SET ip = ?2, last_seen = ?3, model = COALESCE(?4, model) WHERE mac = ?1",
                params![lease.mac, lease.ip, lease.now, lease.model],
            )
            .db(&ctx)?;
        } else {
            let base = default_device_name(&lease.hostname, &lease.mac, lease.model.as_deref());
            let name = free_name(&tx, &base)?;
            tx.execute(
                "INSERT INTO devices (mac, ip, name, type, model, reason, first_seen, last_seen)
                 VALUES (?1, ?2, ?3, 'unknown', ?4, NULL, ?5, ?5)",
                params![lease.mac, lease.ip, name, lease.model, lease.now],
            )
            .db(&ctx)?;
        }
        tx.commit().db(&ctx)?;
        let dev = device_by_mac(&conn, &lease.mac)?
            .ok_or_else(|| StoreError::DeviceNotFound(lease.mac.clone()))?;
        Ok((dev, !known))
    }

    /// Records why a device is (still) `unknown`. A node stays a node.
    pub fn set_unknown_reason(&self, mac: &str, reason: &str) -> Result<()> {
        self.inner
            .conn()
            .execute(
                "UPDATE devices SET reason = ?2 WHERE mac = ?1 AND type = 'unknown'",
                params![mac, reason],
            )
            .db(&format!("recording why {mac} is unknown"))?;
        Ok(())
    }

    /// Makes the device a node of `model` booting `image`. A device that is
    /// already a node keeps its image (a later lease does not reset it).
    /// Returns whether it became a node now.
    pub fn make_node(&self, mac: &str, model: &str, image: &ImageName) -> Result<bool> {
        let ctx = format!("making {mac} a node");
        let mut conn = self.inner.conn();
        let tx = conn.transaction().db(&ctx)?;
        let kind: Option<String> = tx
            .query_row("SELECT type FROM devices WHERE mac = ?1", [mac], |r| {
                r.get(0)
            })
            .optional()
            .db(&ctx)?;
        match kind.as_deref() {
            None => return Err(StoreError::DeviceNotFound(mac.to_string())),
            Some("node") => return Ok(false),
            Some(_) => {}
        }
        let id =
            image_id(&tx, image)?.ok_or_else(|| StoreError::ImageNotFound(image.to_string()))?;
        tx.execute(
            "UPDATE devices SET type = 'node', model = ?2, reason = NULL WHERE mac = ?1",
            params![mac, model],
        )
        .db(&ctx)?;
        tx.execute(
            "INSERT OR REPLACE INTO nodes (mac, model, image_id) VALUES (?1, ?2, ?3)",
            params![mac, model, id],
        )
        .db(&ctx)?;
        tx.commit().db(&ctx)?;
        Ok(true)
    }

    /// Makes every `unknown` device that announced `model` a node booting
    /// `image`, in one transaction (the devices that waited for the
    /// model's default image). Returns their names.
    pub fn make_nodes_of_model(&self, model: &str, image: &ImageName) -> Result<Vec<String>> {
        let ctx = format!("making the {model} devices nodes");
        let mut conn = self.inner.conn();
        let tx = conn.transaction().db(&ctx)?;
        let id =
            image_id(&tx, image)?.ok_or_else(|| StoreError::ImageNotFound(image.to_string()))?;
        let names: Vec<String> = {
            let mut stmt = tx
                .prepare(
                    "SELECT name FROM devices WHERE type = 'unknown' AND model = ?1 ORDER BY name",
                )
                .db(&ctx)?;
            let rows = stmt.query_map([model], |r| r.get(0)).db(&ctx)?;
            rows.collect::<rusqlite::Result<Vec<String>>>().db(&ctx)?
        };
        if names.is_empty() {
            return Ok(names);
        }
        tx.execute(
            "INSERT OR REPLACE INTO nodes (mac, model, image_id)
             SELECT mac, model, ?2 FROM devices WHERE type = 'unknown' AND model = ?1",
            params![model, id],
        )
        .db(&ctx)?;
        tx.execute(
            "UPDATE devices SET type = 'node', reason = NULL WHERE type = 'unknown' AND model = ?1",
            [model],
        )
        .db(&ctx)?;
        tx.commit().db(&ctx)?;
        Ok(names)
    }

    /// Every device, nodes and unknown ones, by name.
    pub fn list_devices(&self) -> Result<Vec<Device>> {
        devices_where(&self.inner.conn(), "", [])
    }

    /// The device of that name, MAC (any case, `:` or `-`) or address.
    pub fn find_device(&self, key: &str) -> Result<Option<Device>> {
        let mac = walt_core::models::normalize_mac(key).unwrap_or_default();
        Ok(devices_where(
            &self.inner.conn(),
            "WHERE d.name = ?1 OR d.mac = ?2 OR d.ip = ?1",
            params![key, mac],
        )?
        .into_iter()
        .next())
    }

    /// Nodes booting `image`.
    pub fn nodes_using(&self, image: &ImageName) -> Result<Vec<Device>> {
        devices_where(
            &self.inner.conn(),
            "WHERE i.owner = ?1 AND i.name = ?2 AND i.tag = ?3",
            params![image.owner, image.name, image.tag],
        )
    }

    /// The models of the nodes present, each once, sorted.
    pub fn node_models(&self) -> Result<Vec<String>> {
        let ctx = "listing node models";
        let conn = self.inner.conn();
        let mut stmt = conn
            .prepare("SELECT DISTINCT model FROM nodes ORDER BY model")
            .db(ctx)?;
        let rows = stmt.query_map([], |r| r.get(0)).db(ctx)?;
        rows.collect::<rusqlite::Result<Vec<String>>>().db(ctx)
    }

    /// Makes the nodes (by MAC) boot `image`, all or none.
    pub fn set_nodes_image(&self, macs: &[String], image: &ImageName) -> Result<()> {
        let ctx = format!("making nodes boot '{image}'");
        let mut conn = self.inner.conn();
        let tx = conn.transaction().db(&ctx)?;
        let id =
            image_id(&tx, image)?.ok_or_else(|| StoreError::ImageNotFound(image.to_string()))?;
        for mac in macs {
            let n = tx
                .execute(
                    "UPDATE nodes SET image_id = ?2 WHERE mac = ?1",
                    params![mac, id],
                )
                .db(&ctx)?;
            if n == 0 {
                return Err(StoreError::DeviceNotFound(mac.clone()));
            }
        }
        tx.commit().db(&ctx)
    }

    /// Renames a device (the caller checked the new name's form).
    pub fn rename_device(&self, from: &str, to: &str) -> Result<()> {
        let ctx = format!("renaming device '{from}' to '{to}'");
        let mut conn = self.inner.conn();
        let tx = conn.transaction().db(&ctx)?;
        if from != to && name_taken(&tx, to)? {
            return Err(StoreError::DeviceExists(to.to_string()));
        }
        let n = tx
            .execute(
                "UPDATE devices SET name = ?2 WHERE name = ?1",
                params![from, to],
            )
            .db(&ctx)?;
        if n == 0 {
            return Err(StoreError::DeviceNotFound(from.to_string()));
        }
        tx.commit().db(&ctx)
    }

    /// Whether `user` was already given a copy of the default image
    /// `default` (given once: a copy the user removed is not given again).
    pub fn default_copy_given(&self, user: &str, default: &ImageName) -> Result<bool> {
        self.inner
            .conn()
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM default_copies WHERE user = ?1 AND image = ?2)",
                params![user, default.to_string()],
                |r| r.get(0),
            )
            .db(&format!("checking the default images given to {user}"))
    }

    /// Records that `user` was given a copy of `default`.
    pub fn record_default_copy(&self, user: &str, default: &ImageName) -> Result<()> {
        self.inner
            .conn()
            .execute(
                "INSERT OR IGNORE INTO default_copies (user, image) VALUES (?1, ?2)",
                params![user, default.to_string()],
            )
            .db(&format!("recording a default image given to {user}"))?;
        Ok(())
    }
}

/// The qemu settings of a virtual node (`walt node config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VnodeConf {
    pub cpu_cores: u32,
    pub ram_mb: u32,
    /// WalT's `disks` value (`none`, `8G`, `8G[template=ext4],1T`...).
    pub disks: String,
}

/// A virtual node as recorded: its device and its qemu settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vnode {
    pub device: Device,
    pub conf: VnodeConf,
}

impl Store {
    /// Records a virtual node: a new device `name` with `mac`, already a
    /// node of `model` booting `image`, with its qemu settings. Refused when
    /// the name or the MAC is taken.
    pub fn create_vnode(
        &self,
        name: &str,
        mac: &str,
        model: &str,
        image: &ImageName,
        conf: &VnodeConf,
        now: i64,
    ) -> Result<Device> {
        let ctx = format!("recording the virtual node {name}");
        let mut conn = self.inner.conn();
        let tx = conn.transaction().db(&ctx)?;
        if name_taken(&tx, name)? {
            return Err(StoreError::DeviceExists(name.to_string()));
        }
        let mac_taken: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM devices WHERE mac = ?1)",
                [mac],
                |r| r.get(0),
            )
            .db(&ctx)?;
        if mac_taken {
            return Err(StoreError::DeviceExists(mac.to_string()));
        }
        let id =
            image_id(&tx, image)?.ok_or_else(|| StoreError::ImageNotFound(image.to_string()))?;
        tx.execute(
            "INSERT INTO devices (mac, ip, name, type, model, reason, first_seen, last_seen)
             VALUES (?1, NULL, ?2, 'node', ?3, NULL, ?4, ?4)",
            params![mac, name, model, now],
        )
        .db(&ctx)?;
        tx.execute(
            "INSERT INTO nodes (mac, model, image_id) VALUES (?1, ?2, ?3)",
            params![mac, model, id],
        )
        .db(&ctx)?;
        tx.execute(
            "INSERT INTO vnodes (mac, cpu_cores, ram_mb, disks) VALUES (?1, ?2, ?3, ?4)",
            params![mac, conf.cpu_cores, conf.ram_mb, conf.disks],
        )
        .db(&ctx)?;
        tx.commit().db(&ctx)?;
        device_by_mac(&conn, mac)?.ok_or_else(|| StoreError::DeviceNotFound(mac.to_string()))
    }

    /// Every virtual node, by name.
    pub fn list_vnodes(&self) -> Result<Vec<Vnode>> {
        let ctx = "listing virtual nodes";
        let conn = self.inner.conn();
        let confs: Vec<(String, VnodeConf)> = {
            let mut stmt = conn
                .prepare("SELECT mac, cpu_cores, ram_mb, disks FROM vnodes")
                .db(ctx)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        VnodeConf {
                            cpu_cores: r.get(1)?,
                            ram_mb: r.get(2)?,
                            disks: r.get(3)?,
                        },
                    ))
                })
                .db(ctx)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db(ctx)?
        };
        let mut out = Vec::with_capacity(confs.len());
        for (mac, conf) in confs {
            if let Some(device) = device_by_mac(&conn, &mac)? {
                out.push(Vnode { device, conf });
            }
        }
        out.sort_by(|a, b| a.device.name.cmp(&b.device.name));
        Ok(out)
    }

    /// The virtual node of that MAC, if it is one.
    pub fn get_vnode(&self, mac: &str) -> Result<Option<Vnode>> {
        Ok(self
            .list_vnodes()?
            .into_iter()
            .find(|v| v.device.mac == mac))
    }

    /// Changes the qemu settings of a virtual node (applied at its next
    /// start).
    pub fn set_vnode_conf(&self, mac: &str, conf: &VnodeConf) -> Result<()> {
        let n = self
            .inner
            .conn()
            .execute(
                "UPDATE vnodes SET cpu_cores = ?2, ram_mb = ?3, disks = ?4 WHERE mac = ?1",
                params![mac, conf.cpu_cores, conf.ram_mb, conf.disks],
            )
            .db(&format!("configuring the virtual node {mac}"))?;
        if n == 0 {
            return Err(StoreError::DeviceNotFound(mac.to_string()));
        }
        Ok(())
    }

    /// Forgets a virtual node: its device, node and qemu records.
    pub fn remove_vnode(&self, mac: &str) -> Result<()> {
        let ctx = format!("removing the virtual node {mac}");
        let mut conn = self.inner.conn();
        let tx = conn.transaction().db(&ctx)?;
        let n = tx
            .execute("DELETE FROM vnodes WHERE mac = ?1", [mac])
            .db(&ctx)?;
        if n == 0 {
            return Err(StoreError::DeviceNotFound(mac.to_string()));
        }
        tx.execute("DELETE FROM nodes WHERE mac = ?1", [mac])
            .db(&ctx)?;
        tx.execute("DELETE FROM devices WHERE mac = ?1", [mac])
            .db(&ctx)?;
        tx.commit().db(&ctx)
    }
}
