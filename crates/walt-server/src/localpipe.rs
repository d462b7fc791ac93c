//! The FIFO of a `walt image cp` client on this machine: the archive goes
//! between the client and the sandbox directly, as in `tar c | tar x`,
//! instead of through the server, TLS and HTTP/2.
//!
//! The path comes from the client and the server is root, so it is opened
//! with care: `O_PATH` without following a final symlink first (opening some
//! devices has effects), then opened for real only when it is a FIFO that
//! belongs to the account owning the client's end of the connection (found
//! in `/proc/net/tcp*`, as identd did). A user cannot make the server read
//! or write anybody else's FIFO: a daemon's control FIFO, another user's
//! copy.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{FileType, Mode, OFlags};

/// Which end of the FIFO the sandbox gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The sandbox reads the client's archive (copy into an image).
    Read,
    /// The sandbox writes the archive the client extracts (copy out).
    Write,
}

/// The two ends of the client's TCP connection, as the server saw them.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub remote: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
}

impl Peer {
    pub fn of<T>(req: &tonic::Request<T>) -> Self {
        Peer {
            remote: req.remote_addr(),
            local: req.local_addr(),
        }
    }
}

/// Opens the client's FIFO at `path` for the sandbox; the error says why
/// it cannot be used (the client then sends the archive in the stream).
pub fn open(path: &str, end: End, peer: Peer) -> Result<OwnedFd, String> {
    let owner = peer
        .remote
        .and_then(|r| client_uid(r, peer.local))
        .ok_or("the client is not on this machine")?;
    open_owned_by(path, end, owner)
}

/// [`open`] for a client known to run as `owner`.
pub fn open_owned_by(path: &str, end: End, owner: u32) -> Result<OwnedFd, String> {
    if !path.starts_with('/') {
        return Err("not an absolute path".into());
    }
    let at = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("{path}: {e}"))?;
    let st = rustix::fs::fstat(&at).map_err(|e| format!("{path}: {e}"))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Fifo {
        return Err(format!("{path}: not a FIFO"));
    }
    if st.st_uid != owner {
        return Err(format!("{path}: not the client's own FIFO"));
    }
    // The same inode, through the O_PATH descriptor: a rename or a symlink
    // put in its place since cannot change what is opened. Non-blocking:
    // the writing end fails at once (ENXIO) when the client is not reading.
    let access = match end {
        End::Read => OFlags::RDONLY,
        End::Write => OFlags::WRONLY,
    };
    let fd = rustix::fs::open(
        format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&at)),
        access | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("{path}: {e}"))?;
    rustix::fs::fcntl_setfl(&fd, OFlags::empty()).map_err(|e| format!("{path}: {e}"))?;
    // 1 MiB in the pipe: the two ends take turns less often.
    let _ = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
    Ok(fd)
}

/// The uid owning the local socket whose address is `client` and which is
/// connected to `server` (when known): the client's end of a connection
/// to this server, from `/proc/net/tcp` and `/proc/net/tcp6` of the
/// server's network namespace. None for a client on another machine.
pub fn client_uid(client: SocketAddr, server: Option<SocketAddr>) -> Option<u32> {
    let client = canonical(client);
    let server = server.map(canonical);
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .find_map(|table| find_uid(&table, client, server))
}

/// IPv4-mapped IPv6 addresses as IPv4: a dual-stack listener sees
/// `::ffff:127.0.0.1` where the client's socket says `127.0.0.1`.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// One table of `/proc/net/tcp*`: the uid of the row whose local address
/// is `client` and remote address `server`.
fn find_uid(table: &str, client: SocketAddr, server: Option<SocketAddr>) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, uid) = (f.get(1)?, f.get(2)?, f.get(7)?);
        if parse_addr(local)? != client {
            return None;
        }
        if let Some(s) = server
            && parse_addr(remote)? != s
        {
            return None;
        }
        uid.parse().ok()
    })
}

/// `0100007F:3039` (IPv4) or 32 hex digits and a port (IPv6): each 32-bit
/// word as the kernel holds it in memory, printed as a native integer.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(canonical(SocketAddr::new(ip, port)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn fifo(dir: &std::path::Path, name: &str) -> String {
        let p = dir.join(name);
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        p.to_str().unwrap().to_string()
    }

    #[test]
    fn the_owner_of_a_loopback_connection_is_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let me = rustix::process::geteuid().as_raw();
        // As the server sees it: the peer is the client's address.
        let peer = s.peer_addr().unwrap();
        assert_eq!(client_uid(peer, Some(s.local_addr().unwrap())), Some(me));
        assert_eq!(client_uid(peer, None), Some(me));
        // Seen from a dual-stack listener.
        let mapped = SocketAddr::new(
            IpAddr::V6(match peer.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            }),
            peer.port(),
        );
        assert_eq!(client_uid(mapped, None), Some(me));
        // An address no socket of this machine has.
        drop(c);
        let gone: SocketAddr = "192.0.2.1:9".parse().unwrap();
        assert_eq!(client_uid(gone, None), None);
    }

    #[test]
    fn addresses_of_the_kernel_tables_parse() {
        assert_eq!(
            parse_addr("0100007F:3039"),
            Some("127.0.0.1:12345".parse().unwrap())
        );
        assert_eq!(
            parse_addr("00000000000000000000000001000000:0016"),
            Some("[::1]:22".parse().unwrap())
        );
        // Mapped IPv4 compares as IPv4.
        assert_eq!(
            parse_addr("0000000000000000FFFF00000100007F:0050"),
            Some("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(parse_addr("zz:1"), None);
    }

    #[test]
    fn only_the_clients_own_fifo_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let me = rustix::process::geteuid().as_raw();
        let own = fifo(dir.path(), "own");
        // Read end: the data written into the FIFO comes out of it.
        let fd = open_owned_by(&own, End::Read, me).unwrap();
        let mut w = std::fs::OpenOptions::new().write(true).open(&own).unwrap();
        w.write_all(b"tar").unwrap();
        drop(w);
        let mut got = String::new();
        std::fs::File::from(fd).read_to_string(&mut got).unwrap();
        assert_eq!(got, "tar");

        // Somebody else's FIFO.
        let err = open_owned_by(&own, End::Read, me + 1).unwrap_err();
        assert!(err.contains("not the client's own FIFO"), "{err}");
        // A regular file, a symlink to a FIFO, a relative path.
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let err = open_owned_by(file.to_str().unwrap(), End::Read, me).unwrap_err();
        assert!(err.contains("not a FIFO"), "{err}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&own, &link).unwrap();
        assert!(open_owned_by(link.to_str().unwrap(), End::Read, me).is_err());
        assert!(open_owned_by("own", End::Read, me).is_err());
        // The writing end wants a reader: none yet.
        let err = open_owned_by(&own, End::Write, me).unwrap_err();
        assert!(err.contains("No such device"), "{err}");
    }
}
