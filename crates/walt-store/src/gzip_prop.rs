//! Property tests of [`GzipReader`] against flate2: random data, levels,
//! header fields, member splits and buffer sizes give flate2's output;
//! corrupted or truncated streams give an error or flate2's output, never a
//! panic or a hang. Runs with and without the `isal` feature (tests/run).
//! `PROPTEST_CASES` overrides the number of cases (see docs/testing.md).

use std::io::{self, Read, Write};
use std::sync::mpsc;
use std::time::Duration;

use flate2::read::MultiGzDecoder;
use proptest::prelude::*;

use super::GzipReader;
use crate::inflate::Inflater;

fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    ProptestConfig::with_cases(cases)
}

/// Data that compresses in every way: random bytes, runs, repeated
/// phrases (long matches), in random order.
fn data() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..2048),
        (any::<u8>(), 0usize..20_000).prop_map(|(b, n)| vec![b; n]),
        (prop::collection::vec(any::<u8>(), 1..40), 1usize..500).prop_map(|(p, n)| p.repeat(n)),
    ];
    prop::collection::vec(piece, 0..6).prop_map(|v| v.concat())
}

#[derive(Debug, Clone)]
struct Member {
    level: u32,
    name: Option<Vec<u8>>,
    comment: Option<Vec<u8>>,
    extra: Option<Vec<u8>>,
    mtime: u32,
}

fn member() -> impl Strategy<Value = Member> {
    let text = prop::collection::vec(1u8..=255, 0..40);
    (
        0u32..=9,
        prop::option::of(text.clone()),
        prop::option::of(text),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..300)),
        any::<u32>(),
    )
        .prop_map(|(level, name, comment, extra, mtime)| Member {
            level,
            name,
            comment,
            extra,
            mtime,
        })
}

fn encode(data: &[u8], m: &Member) -> Vec<u8> {
    let mut b = flate2::GzBuilder::new().mtime(m.mtime);
    if let Some(n) = &m.name {
        b = b.filename(n.clone());
    }
    if let Some(c) = &m.comment {
        b = b.comment(c.clone());
    }
    if let Some(x) = &m.extra {
        b = b.extra(x.clone());
    }
    let mut e = b.write(Vec::new(), flate2::Compression::new(m.level));
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `data` split at `cuts` (fractions), one member per piece.
fn encode_members(data: &[u8], members: &[Member], cuts: &[f64]) -> Vec<u8> {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|f| (f * data.len() as f64) as usize)
        .collect();
    points.sort_unstable();
    let mut out = Vec::new();
    let mut start = 0;
    for (i, m) in members.iter().enumerate() {
        let end = if i + 1 == members.len() {
            data.len()
        } else {
            points.get(i).copied().unwrap_or(data.len()).max(start)
        };
        out.extend(encode(&data[start..end], m));
        start = end;
    }
    out
}

fn flate2_decode(bytes: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    MultiGzDecoder::new(bytes).read_to_end(&mut out)?;
    Ok(out)
}

/// Reads with an input buffer of `cap` bytes and reads of `chunk` bytes.
fn ours(bytes: &[u8], crc: bool, cap: usize, chunk: usize, zlib: bool) -> io::Result<Vec<u8>> {
    let r = io::BufReader::with_capacity(cap, bytes);
    let inflater = if zlib {
        Inflater::zlib()
    } else {
        Inflater::new()
    };
    let mut g = GzipReader::with_inflater(r, crc, inflater);
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        let n = g.read(&mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// [`ours`] on another thread: a hang fails the test instead of stalling it.
fn ours_bounded(
    bytes: Vec<u8>,
    crc: bool,
    cap: usize,
    chunk: usize,
    zlib: bool,
) -> io::Result<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(ours(&bytes, crc, cap, chunk, zlib));
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(r) => r,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("the gzip reader does not return"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the gzip reader panicked"),
    }
}

#[derive(Debug, Clone)]
enum Damage {
    Flip { at: f64, mask: u8 },
    Truncate { at: f64 },
    Insert { at: f64, bytes: Vec<u8> },
    Append { bytes: Vec<u8> },
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (0.0..1.0f64, 1u8..=255).prop_map(|(at, mask)| Damage::Flip { at, mask }),
        (0.0..1.0f64).prop_map(|at| Damage::Truncate { at }),
        (0.0..1.0f64, prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(at, bytes)| Damage::Insert { at, bytes }),
        prop::collection::vec(any::<u8>(), 1..64).prop_map(|bytes| Damage::Append { bytes }),
    ]
}

fn apply(bytes: &mut Vec<u8>, d: &Damage) {
    let pos = |at: f64, len: usize| ((at * len as f64) as usize).min(len.saturating_sub(1));
    match d {
        // An earlier truncation may have left nothing to flip.
        Damage::Flip { .. } if bytes.is_empty() => {}
        Damage::Flip { at, mask } => {
            let i = pos(*at, bytes.len());
            bytes[i] ^= mask;
        }
        Damage::Truncate { at } => bytes.truncate(pos(*at, bytes.len())),
        Damage::Insert { at, bytes: b } => {
            let i = pos(*at, bytes.len());
            bytes.splice(i..i, b.iter().copied());
        }
        Damage::Append { bytes: b } => bytes.extend_from_slice(b),
    }
}

proptest! {
    #![proptest_config(config(500))]

    #[test]
    fn prop_gzip_output_equals_flate2(
        data in data(),
        members in prop::collection::vec(member(), 1..4),
        cuts in prop::collection::vec(0.0..1.0f64, 3),
        crc in any::<bool>(),
        cap in prop_oneof![1usize..16, 16usize..4096, Just(256 * 1024)],
        chunk in prop_oneof![1usize..64, 64usize..70_000],
    ) {
        let bytes = encode_members(&data, &members, &cuts);
        let reference = flate2_decode(&bytes).unwrap();
        prop_assert_eq!(&reference, &data);
        for zlib in [true, false] {
            let got = ours(&bytes, crc, cap, chunk, zlib);
            prop_assert!(got.is_ok(), "zlib={} {:?}", zlib, got.as_ref().err());
            prop_assert!(got.unwrap() == reference, "zlib={}: output differs from flate2's", zlib);
        }
    }

    #[test]
    fn prop_gzip_damaged_streams_fail_cleanly(
        data in data(),
        members in prop::collection::vec(member(), 1..3),
        cuts in prop::collection::vec(0.0..1.0f64, 2),
        damages in prop::collection::vec(damage(), 1..4),
        crc in any::<bool>(),
        cap in prop_oneof![1usize..16, 16usize..4096],
        zlib in any::<bool>(),
    ) {
        let good = encode_members(&data, &members, &cuts);
        let mut bytes = good.clone();
        for d in &damages {
            apply(&mut bytes, d);
        }
        let got = ours_bounded(bytes.clone(), crc, cap, 8192, zlib);
        match got {
            Err(e) => prop_assert!(
                e.to_string().starts_with("invalid gzip stream"),
                "unexpected error: {}", e
            ),
            Ok(out) => {
                // Accepted: the damage spared the data (a header field, a
                // CRC not checked, a cut at a member boundary), so the
                // output is a prefix of the data made of whole members, or
                // what flate2 also reads from these bytes.
                // Without a CRC check (the layer digest covers the bytes), a
                // damaged stored block may give other data of the same size.
                let checked = crc || (!zlib && Inflater::new().reads_trailer());
                let flate2 = flate2_decode(&bytes).ok();
                prop_assert!(
                    !checked || data.starts_with(&out) || flate2.as_deref() == Some(&out[..]),
                    "damaged stream accepted with other data ({} bytes)", out.len()
                );
                if crc && bytes.len() < good.len() && members.len() == 1 {
                    // A strict prefix of one member is never a complete stream
                    // (unless only trailing bytes after it were cut: none here).
                    prop_assert!(
                        !good.starts_with(&bytes) || bytes.is_empty(),
                        "a truncated stream was accepted"
                    );
                }
            }
        }
    }
}
