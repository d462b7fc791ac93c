//! Plain text tables: columns separated by two spaces, no trailing blanks.
//! Cells are one line each, their control characters shown escaped
//! (names, tags and labels may come from a registry).

use tabled::builder::Builder;
use tabled::settings::object::Columns;
use tabled::settings::{Padding, Style};

/// Columns as wide as their widest cell (header included), left-aligned, two spaces
/// between columns, no border or rule; each line ends without trailing blanks.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut builder = Builder::with_capacity(rows.len() + 1, header.len());
    builder.push_record(header.iter().copied());
    for row in rows {
        builder.push_record(row.iter().map(|c| walt_core::text::one_line(c)));
    }
    let mut table = builder.build();
    table
        .with(Style::empty())
        .with(Padding::new(0, 2, 0, 0))
        .modify(Columns::last(), Padding::zero());
    let text = table.to_string();
    let mut out = String::with_capacity(text.len() + 1);
    for line in text.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A table as WalT prints them (`walt image show`, `walt image search`):
/// the header, a rule of dashes as wide as each column, then the rows; every
/// cell left-aligned and padded to its column's width, the last column
/// too, columns separated by two spaces; lines joined by `\n`, none after
/// the last. Widths are display widths; cells are shown on one line with
/// their control characters escaped.
pub fn columnate(header: &[&str], rows: &[Vec<String>]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .map(|c| walt_core::text::one_line(c).into_owned())
                .collect()
        })
        .collect();
    let width = |s: &str| tabled::grid::util::string::get_string_width(s);
    let mut widths: Vec<usize> = header.iter().map(|h| width(h)).collect();
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(width(cell));
        }
    }
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let mut out = String::new();
    for (i, row) in std::iter::once(&header)
        .chain(std::iter::once(&rule))
        .chain(&cells)
        .enumerate()
    {
        if i > 0 {
            out.push('\n');
        }
        for (j, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if j > 0 {
                out.push_str("  ");
            }
            out.push_str(cell);
            out.extend(std::iter::repeat_n(' ', w.saturating_sub(width(cell))));
        }
    }
    out
}

/// `YYYY-MM-DD HH:MM:SS` in local time (the `TZ` environment variable,
/// else the system's zone) for seconds since the epoch, as WalT shows
/// image creation times; UTC when the local time cannot be computed.
pub fn local_datetime(secs: i64) -> String {
    // POSIX `tzset` (the libc crate does not declare it): (re)reads `TZ`.
    unsafe extern "C" {
        fn tzset();
    }
    let t: libc::time_t = secs;
    // SAFETY: tzset only (re)reads the time zone into libc's own state;
    // localtime_r reads `t` and writes into `tm`, both ours and valid for
    // the call. No safe wrapper of the C library's zone handling exists
    // among our dependencies.
    let tm = unsafe {
        tzset();
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return datetime(secs);
        }
        tm
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) for seconds since the epoch.
pub fn datetime(secs: i64) -> String {
    let ((y, m, d), h, mi, s) = walt_core::civil::split_secs(secs);
    format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables() {
        let t = render(
            &["NAME", "X"],
            &[
                vec!["a".into(), "1".into()],
                vec!["long-name".into(), "".into()],
            ],
        );
        assert_eq!(t, "NAME       X\na          1\nlong-name\n");
    }

    /// The hand-written renderer that `render` replaced: widths in chars, two spaces
    /// between columns, lines trimmed at the end.
    fn by_hand(header: &[&str], rows: &[Vec<String>]) -> String {
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for row in rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let lines = std::iter::once(header.iter().map(|h| h.to_string()).collect::<Vec<_>>())
            .chain(rows.iter().cloned());
        for cells in lines {
            let mut l = String::new();
            for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
                if i > 0 {
                    l.push_str("  ");
                }
                l.push_str(cell);
                l.extend(std::iter::repeat_n(' ', w - cell.chars().count()));
            }
            out.push_str(l.trim_end());
            out.push('\n');
        }
        out
    }

    fn rows(rows: &[&[&str]]) -> Vec<Vec<String>> {
        rows.iter()
            .map(|r| r.iter().map(|c| c.to_string()).collect())
            .collect()
    }

    #[test]
    fn same_output_as_the_hand_written_tables() {
        let cases: Vec<(Vec<&str>, Vec<Vec<String>>)> = vec![
            // No rows: the header alone.
            (vec!["NAME", "IN-USE", "CREATED", "COMPATIBILITY"], vec![]),
            // The `walt image show` table.
            (
                vec!["NAME", "IN-USE", "CREATED", "COMPATIBILITY"],
                rows(&[
                    &[
                        "pc-x86-64-default",
                        "True",
                        "2023-11-14 22:13:20",
                        "pc-x86-64",
                    ],
                    &[
                        "a",
                        "False",
                        "1970-01-01 00:00:00",
                        "rpi-b, rpi-b-plus, rpi-2-b",
                    ],
                ]),
            ),
            // Empty cells, first, middle and last; a whole empty row.
            (
                vec![
                    "USER",
                    "IMAGE NAME",
                    "LOCATION",
                    "COMPATIBILITY",
                    "CLONE URL",
                ],
                rows(&[
                    &["", "img", "", "", "hub:u/img"],
                    &["waltplatform", "", "docker hub", "", ""],
                    &["", "", "", "", ""],
                ]),
            ),
            // Cells wider than their header, header wider than its cells.
            (
                vec!["A", "LONG HEADER", "B"],
                rows(&[&["a very long first cell", "x", "bb"], &["c", "", "d"]]),
            ),
            // Non-ASCII characters one column wide.
            (
                vec!["NAME", "OWNER"],
                rows(&[
                    &["caf\u{e9}-\u{e9}t\u{e9}", "j\u{fc}rgen"],
                    &["ab", "\u{f8}"],
                ]),
            ),
            // A single column.
            (vec!["NAME"], rows(&[&["x"], &["longer"], &[""]])),
        ];
        for (header, rows) in &cases {
            assert_eq!(
                render(header, rows),
                by_hand(header, rows),
                "{header:?} {rows:?}"
            );
        }
    }

    #[test]
    fn wide_characters_align_on_screen() {
        // Two columns per character on a terminal: the next column starts after the
        // displayed width (the hand-written tables counted chars and misaligned here).
        let t = render(
            &["NAME", "X"],
            &rows(&[&["\u{65e5}\u{672c}", "1"], &["abcdef", "2"]]),
        );
        assert_eq!(t, "NAME    X\n\u{65e5}\u{672c}    1\nabcdef  2\n");
    }

    #[test]
    fn cells_from_outside_are_escaped_on_one_line() {
        let t = render(
            &["NAME", "X"],
            &rows(&[
                &["a\u{1b}[2Jb", "two\nlines"],
                &["\u{202e}gpj.exe", "\u{9b}1"],
            ]),
        );
        assert_eq!(
            t,
            "NAME             X\n\
             a\\x1b[2Jb        two lines\n\
             \\u{202e}gpj.exe  \\u{9b}1\n"
        );
        assert!(!t.contains(['\u{1b}', '\u{202e}', '\u{9b}']));
    }

    #[test]
    fn walt_tables_have_a_rule_and_padded_cells() {
        let t = columnate(
            &["name", "in-use"],
            &rows(&[&["img", "True"], &["longer-name", "False"]]),
        );
        assert_eq!(
            t,
            "name         in-use\n\
             -----------  ------\n\
             img          True  \n\
             longer-name  False "
        );
        // Empty cells are padded; wide characters count twice.
        let t = columnate(&["a", "b"], &rows(&[&["\u{65e5}", ""], &["", "x"]]));
        assert_eq!(t, "a   b\n--  -\n\u{65e5}   \n    x");
        // No rows: the header and its rule.
        assert_eq!(
            columnate(&["User", "Image name"], &[]),
            "User  Image name\n----  ----------"
        );
    }

    #[test]
    fn local_dates_follow_tz() {
        // A POSIX zone needs no zone database: 3 hours east of UTC.
        // SAFETY: nextest (the project's runner) runs each test in its own
        // process: no other thread reads the environment meanwhile.
        unsafe { std::env::set_var("TZ", "XYZ-3") };
        assert_eq!(local_datetime(1_700_000_000), "2023-11-15 01:13:20");
        // SAFETY: as above.
        unsafe { std::env::set_var("TZ", "UTC0") };
        assert_eq!(local_datetime(1_700_000_000), "2023-11-14 22:13:20");
    }

    #[test]
    fn dates() {
        assert_eq!(datetime(0), "1970-01-01 00:00:00");
        assert_eq!(datetime(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(datetime(951_782_400), "2000-02-29 00:00:00");
    }
}
