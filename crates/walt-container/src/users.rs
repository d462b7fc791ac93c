//! Docker's USER and `--chown` values, resolved in the image's /etc/passwd and /etc/group
//! (read from inside the image root, bounded).

use std::io::Read;
use std::path::Path;

/// Largest /etc/passwd or /etc/group read (bytes).
pub(crate) const MAX_DB: u64 = 4 << 20;

/// Who an Exec job runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExecUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// The passwd home, when the user has an entry.
    pub home: Option<String>,
}

/// The image's passwd and group databases (`None`: the file is missing).
pub(crate) struct Dbs {
    pub passwd: Option<String>,
    pub group: Option<String>,
}

impl Dbs {
    /// Reads `/etc/passwd` and `/etc/group` of the current root (the image's, after chroot
    /// or pivot_root).
    pub(crate) fn read() -> Result<Dbs, String> {
        Ok(Dbs {
            passwd: read_db(Path::new("/etc/passwd"))?,
            group: read_db(Path::new("/etc/group"))?,
        })
    }
}

/// A regular file of at most [`MAX_DB`] bytes; `None` when missing. A fifo or a device
/// there is refused without blocking on it.
fn read_db(p: &Path) -> Result<Option<String>, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(p)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read the image's {}: {e}", p.display())),
    };
    match f.metadata() {
        Ok(m) if m.is_file() => {}
        _ => {
            return Err(format!("the image's {} is not a regular file", p.display()));
        }
    }
    let mut buf = Vec::new();
    f.take(MAX_DB + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read the image's {}: {e}", p.display()))?;
    if buf.len() as u64 > MAX_DB {
        return Err(format!(
            "the image's {} is larger than {} MiB",
            p.display(),
            MAX_DB >> 20
        ));
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

struct PwEnt<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

struct GrEnt<'a> {
    name: &'a str,
    gid: u32,
    members: &'a str,
}

fn passwd_entries(db: &str) -> impl Iterator<Item = PwEnt<'_>> {
    db.lines().filter_map(|l| {
        let f: Vec<&str> = l.splitn(7, ':').collect();
        if f.len() < 4 || f[0].is_empty() || l.starts_with('#') {
            return None;
        }
        Some(PwEnt {
            name: f[0],
            uid: f[2].trim().parse().ok()?,
            gid: f[3].trim().parse().ok()?,
            home: f.get(5).copied().unwrap_or(""),
        })
    })
}

fn group_entries(db: &str) -> impl Iterator<Item = GrEnt<'_>> {
    db.lines().filter_map(|l| {
        let f: Vec<&str> = l.splitn(4, ':').collect();
        if f.len() < 3 || f[0].is_empty() || l.starts_with('#') {
            return None;
        }
        Some(GrEnt {
            name: f[0],
            gid: f[2].trim().parse().ok()?,
            members: f.get(3).copied().unwrap_or(""),
        })
    })
}

fn numeric(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn unknown_user(name: &str) -> String {
    format!("unable to find user {name}: no matching entries in passwd file")
}

fn unknown_group(name: &str) -> String {
    format!("unable to find group {name}: no matching entries in group file")
}

/// A group given by name or number: its gid.
fn find_group(dbs: &Dbs, g: &str) -> Result<u32, String> {
    let by_num = numeric(g);
    let found = dbs.group.as_deref().and_then(|db| {
        group_entries(db)
            .find(|e| match by_num {
                Some(n) => e.gid == n,
                None => e.name == g,
            })
            .map(|e| e.gid)
    });
    match (found, by_num) {
        (Some(gid), _) => Ok(gid),
        (None, Some(n)) => Ok(n),
        (None, None) => Err(unknown_group(g)),
    }
}

/// Docker's USER (`name`, `uid`, `name:group`, `uid:gid`...; empty: root), as runc
/// resolves it: the passwd entry's gid unless a group is given; supplementary groups are
/// those listing the user's name, and only when no group is given.
pub(crate) fn exec_user(spec: &str, dbs: &Dbs) -> Result<ExecUser, String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    let by_num = numeric(user);
    if by_num.is_none() && user.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("uid {user} is out of range"));
    }
    let ent = dbs.passwd.as_deref().and_then(|db| {
        passwd_entries(db).find(|e| match by_num {
            Some(n) => e.uid == n,
            None => e.name == user,
        })
    });
    let mut out = match (&ent, by_num) {
        (Some(e), _) => ExecUser {
            uid: e.uid,
            gid: e.gid,
            groups: Vec::new(),
            home: Some(e.home.to_string()),
        },
        (None, Some(n)) => ExecUser {
            uid: n,
            gid: 0,
            groups: Vec::new(),
            home: None,
        },
        (None, None) => return Err(unknown_user(user)),
    };
    match group {
        Some(g) if !g.is_empty() => {
            out.gid = find_group(dbs, g)?;
            out.groups.push(out.gid);
        }
        _ => {
            // As docker: the primary group is among the groups too.
            out.groups.push(out.gid);
            if let (Some(e), Some(db)) = (&ent, dbs.group.as_deref()) {
                for g in group_entries(db) {
                    if g.members.split(',').any(|m| m.trim() == e.name)
                        && !out.groups.contains(&g.gid)
                    {
                        out.groups.push(g.gid);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// A `--chown` value: `user[:group]`, names or numbers. Without a group, the gid is
/// the same number as the uid (docker's rule, even for a user given by name).
pub(crate) fn chown(spec: &str, dbs: &Dbs) -> Result<(u32, u32), String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() {
        return Err(format!("invalid --chown value '{spec}': no user"));
    }
    let (uid, mut gid) = match numeric(user) {
        Some(n) => (n, n),
        None if user.bytes().all(|b| b.is_ascii_digit()) => {
            return Err(format!("uid {user} is out of range"));
        }
        None => {
            let e = dbs
                .passwd
                .as_deref()
                .and_then(|db| passwd_entries(db).find(|e| e.name == user))
                .ok_or_else(|| unknown_user(user))?;
            // As docker (its documented rule): without a group, the gid
            // is the uid's number, not the user's passwd group.
            (e.uid, e.uid)
        }
    };
    if let Some(g) = group
        && !g.is_empty()
    {
        gid = find_group(dbs, g)?;
    }
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dbs() -> Dbs {
        Dbs {
            passwd: Some(
                "root:x:0:0:root:/root:/bin/sh\nbob:x:1000:1001:Bob:/home/bob:/bin/sh\n# c\nnohome:x:1002:1002\n"
                    .into(),
            ),
            group: Some("root:x:0:\nbob:x:1001:\nstaff:x:50:bob,alice\nwheel:x:10:root,bob\n".into()),
        }
    }

    #[test]
    fn exec_users() {
        let d = dbs();
        let r = exec_user("", &d).unwrap();
        assert_eq!(
            (r.uid, r.gid, r.groups, r.home.as_deref()),
            (0, 0, vec![0, 10], Some("/root"))
        );
        let r = exec_user("bob", &d).unwrap();
        assert_eq!(
            (r.uid, r.gid, r.groups.clone()),
            (1000, 1001, vec![1001, 50, 10])
        );
        assert_eq!(r.home.as_deref(), Some("/home/bob"));
        assert_eq!(exec_user("1000", &d).unwrap().gid, 1001);
        let r = exec_user("1234", &d).unwrap();
        assert_eq!((r.uid, r.gid, r.groups, r.home), (1234, 0, vec![0], None));
        let r = exec_user("bob:staff", &d).unwrap();
        assert_eq!((r.uid, r.gid, r.groups), (1000, 50, vec![50]));
        assert_eq!(exec_user("1234:77", &d).unwrap().gid, 77);
        assert_eq!(
            exec_user("alice", &d).unwrap_err(),
            "unable to find user alice: no matching entries in passwd file"
        );
        assert_eq!(
            exec_user("bob:nogroup", &d).unwrap_err(),
            "unable to find group nogroup: no matching entries in group file"
        );
        let none = Dbs {
            passwd: None,
            group: None,
        };
        assert_eq!(exec_user("5:6", &none).unwrap().gid, 6);
        assert!(exec_user("bob", &none).is_err());
        assert!(exec_user("99999999999", &d).is_err());
    }

    #[test]
    fn chown_values() {
        let d = dbs();
        assert_eq!(chown("bob", &d).unwrap(), (1000, 1000));
        assert_eq!(chown("1000", &d).unwrap(), (1000, 1000));
        assert_eq!(chown("7", &d).unwrap(), (7, 7));
        assert_eq!(chown("bob:staff", &d).unwrap(), (1000, 50));
        assert_eq!(chown("7:8", &d).unwrap(), (7, 8));
        assert!(chown("alice", &d).is_err());
        assert!(chown("7:nogroup", &d).is_err());
    }
}
