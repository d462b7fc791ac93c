//! `walt image show` and `walt image search` print what WalT prints: whole
//! outputs compared with golden texts (titles, columns, rules of dashes,
//! padding, footnotes); the creation dates are computed from the configs
//! of the images the test made, in the time zone the CLI is given. And
//! every refusal of the image commands: exit status ≠ 0, nothing on stdout.

use std::time::Duration;

use walt_e2e::docker::Dockerd;
use walt_e2e::walt::{Walt, wait_output};
use walt_e2e::*;

/// The time zone given to the CLI: 2 hours east of UTC, no zone database needed.
const TZ: &str = "XYZ-2";
const TZ_OFFSET: i64 = 2 * 3600;

/// A tiny image (one small layer) with `config`.
fn tiny(images: &ImageBuilder, config: ImageConfig, marker: &str) -> BuiltImage {
    let layer = images
        .layer(
            Format::Oci,
            Compression::Gzip,
            &[RawEntry::file("marker", marker.as_bytes())],
        )
        .unwrap();
    images.image(Format::Oci, config, &[layer]).unwrap()
}

/// `walt ARGS` run with `TZ` set.
fn run_tz(walt: &Walt, args: &[&str]) -> CmdOutput {
    let child = walt
        .command(args)
        .env("TZ", TZ)
        .spawn()
        .expect("cannot start walt");
    wait_output(
        child,
        &format!("TZ={TZ} walt {}", args.join(" ")),
        Duration::from_secs(300),
    )
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD HH:MM:SS` of seconds since the epoch (UTC).
fn civil(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Search the date (the test's own, simple inverse of days_from_civil).
    let mut y = 1970 + days / 366;
    while days_from_civil(y + 1, 1, 1) <= days {
        y += 1;
    }
    let mut m = 1;
    while m < 12 && days_from_civil(y, m + 1, 1) <= days {
        m += 1;
    }
    let d = days - days_from_civil(y, m, 1) + 1;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The `created` of the image's config, as the CLI shows it in `TZ`.
fn shown_created(img: &BuiltImage) -> String {
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&img.config.path).unwrap()).unwrap();
    let t = config["created"]
        .as_str()
        .expect("the config has a created time");
    // `YYYY-MM-DDTHH:MM:SS[.frac]Z` as the image builder writes it.
    assert!(t.ends_with('Z') && t.len() >= 20, "{t}");
    let n = |r: std::ops::Range<usize>| t[r].parse::<i64>().unwrap();
    let secs = days_from_civil(n(0..4), n(5..7), n(8..10)) * 86_400
        + n(11..13) * 3600
        + n(14..16) * 60
        + n(17..19);
    civil(secs + TZ_OFFSET)
}

/// Golden text: lines end with `|` where the line ends (so the padding
/// WalT leaves at the end of table lines is visible here); `|` is removed.
fn golden(lines: &[&str]) -> String {
    let mut s = String::new();
    for l in lines {
        s.push_str(l.strip_suffix('|').unwrap_or(l));
        s.push('\n');
    }
    s
}

#[track_caller]
fn assert_text(out: &CmdOutput, want: &str) {
    out.assert_success();
    assert_eq!(
        out.stdout, want,
        "\n--- got ---\n{}\n--- want ---\n{}\n",
        out.stdout, want
    );
}

#[test]
fn show_prints_walt_tables() {
    let env = Env::start();
    let multi = tiny(
        &env.images,
        ImageConfig::amd64("pc-x86-64,pc-x86-32"),
        "multi",
    );
    let rpi = tiny(
        &env.images,
        ImageConfig::armv7("rpi-3-b,rpi-3-b-plus,rpi-4-b"),
        "rpi",
    );
    env.push_local("eve/multi", "latest", &multi);
    env.push_local("eve/rpi", "v1", &rpi);

    // An empty working set, and nothing else on the server.
    let out = run_tz(&env.alice, &["image", "show"]);
    assert_text(&out, "Your working set is empty.\n");
    let out = run_tz(&env.alice, &["image", "show", "--all"]);
    assert_text(&out, "No OS images found!\n");
    let out = run_tz(&env.alice, &["image", "show", "--names-only"]);
    assert_text(&out, "");

    env.alice.clone_ok(&["local:eve/multi"]);
    env.alice.clone_ok(&["local:eve/rpi:v1"]);
    env.bob.clone_ok(&["local:eve/multi", "bobimg"]);
    let platform = env.server.cli("waltplatform", &[]);
    platform.clone_ok(&["local:eve/multi", "pc-x86-64-default"]);
    let (cm, cr) = (shown_created(&multi), shown_created(&rpi));
    assert_ne!(cm, "", "dates are computed");

    // alice: her images, WalT's hint about --all.
    let out = run_tz(&env.alice, &["image", "show"]);
    let want = golden(&[
        "",
        "Your working set is made of the following images:",
        "",
        "name    in-use  created              compatibility       |",
        "------  ------  -------------------  --------------------|",
        &format!("multi   False   {cm}  pc-x86-[64|32]      |"),
        &format!("rpi:v1  False   {cr}  rpi-[3-b[-plus]|4-b]|"),
        "",
        "Re-run with --all to see all OS images on this platform.",
    ]);
    assert_text(&out, &want);

    // --all: the other users' images, then the default images, then the tips.
    let out = run_tz(&env.alice, &["image", "show", "--all"]);
    let want = golden(&[
        "",
        "Your working set is made of the following images:",
        "",
        "name    in-use  created              compatibility       |",
        "------  ------  -------------------  --------------------|",
        &format!("multi   False   {cm}  pc-x86-[64|32]      |"),
        &format!("rpi:v1  False   {cr}  rpi-[3-b[-plus]|4-b]|"),
        "",
        "",
        "Other users of this platform have created the following images:",
        "",
        "user  name    created              clonable-link  |",
        "----  ------  -------------------  ---------------|",
        &format!("bob   bobimg  {cm}  walt:bob/bobimg|"),
        "",
        "",
        "The following are default OS images:",
        "",
        "name               created              clonable-link                      |",
        "-----------------  -------------------  -----------------------------------|",
        &format!("pc-x86-64-default  {cm}  walt:waltplatform/pc-x86-64-default|"),
        "",
        "Use 'walt image clone <clonable_link>' to clone an image",
        "into your working set.",
        "Use 'walt image search [<keyword>]' to search for images",
        "on remote registries.",
    ]);
    assert_text(&out, &want);

    // Names only: one per line, the tag when not latest.
    let out = run_tz(&env.alice, &["image", "show", "--names-only"]);
    assert_text(&out, "multi\nrpi:v1\n");

    // A new user: empty working set, other images exist.
    let carol = env.server.cli("carol", &[]);
    let out = run_tz(&carol, &["image", "show"]);
    assert_text(
        &out,
        "Your working set is empty.\nRe-run with --all to see all OS images on this platform.\n",
    );

    // --refresh: everything is there; then a layer blob goes missing.
    let out = run_tz(&env.alice, &["image", "show", "--refresh"]);
    out.assert_success();
    assert!(!out.stderr.contains("warning"), "{out}");
    let blob = &multi.layers[0].digest;
    let hex = blob.strip_prefix("sha256:").unwrap();
    let path = env.server.data_dir().join("blobs").join("sha256").join(hex);
    assert!(path.is_file(), "{} not in the store", path.display());
    std::fs::remove_file(&path).unwrap();
    let out = run_tz(&env.alice, &["image", "show", "--refresh"]);
    out.assert_success();
    for image in [
        "alice/multi",
        "bob/bobimg",
        "waltplatform/pc-x86-64-default",
    ] {
        assert!(
            out.stderr.contains(&format!(
                "warning: image '{image}': layer blob {blob} is missing"
            )),
            "{image}: {out}"
        );
    }
    assert!(!out.stderr.contains("alice/rpi"), "{out}");
    // The table is printed all the same.
    assert!(out.stdout.contains("rpi:v1  False"), "{out}");
}

#[test]
fn search_prints_walt_table() {
    let local = Registry::start(RegistryOpts::plain()).unwrap();
    let hub = Registry::start(RegistryOpts::plain()).unwrap();
    let search = HubFixture::start(hub.client(), 100).unwrap();
    let dockerd = Dockerd::start().unwrap();
    dockerd
        .import_busybox("walt-test/dimg:latest", Some("pc-x86-64"), "from docker")
        .unwrap();
    let yaml = format!(
        "registries:\n\
         -   label: hub\n    api: docker-hub\n    description: Test hub\n\
         \x20   registry-url: http://127.0.0.1:{}\n    search-url: {}\n\
         {}docker:\n    socket: {}\n",
        hub.port(),
        search.url(),
        local.server_entry("local"),
        dockerd.socket().display()
    );
    let server = WaltServer::start_with_config(&yaml).unwrap();
    let images = ImageBuilder::new().unwrap();
    let multi = tiny(&images, ImageConfig::amd64("pc-x86-64,pc-x86-32"), "m");
    let rpi = tiny(
        &images,
        ImageConfig::armv7("rpi-3-b,rpi-3-b-plus,rpi-4-b"),
        "r",
    );
    let future = tiny(
        &images,
        ImageConfig::amd64("pc-x86-64").label("walt.server.minversion", "99"),
        "f",
    );
    let client = local.client();
    client.push_image("eve/multi", "latest", &multi).unwrap();
    client.push_image("eve/rpi", "v1", &rpi).unwrap();
    client.push_image("eve/future", "latest", &future).unwrap();

    let alice = server.cli("alice", &[("hub", "alice", "alice-pass")]);
    alice.clone_ok(&["local:eve/rpi:v1", "rpi"]);
    alice
        .run(&["image", "publish", "--registry", "hub", "rpi"])
        .assert_success();
    let carol = server.cli("carol", &[]);

    let out = run_tz(&carol, &["image", "search"]);
    let want = golden(&[
        "User       Image name  Location           Compatibility         Clonable link                     |",
        "---------  ----------  -----------------  --------------------  ----------------------------------|",
        "alice      rpi         docker hub         rpi-[3-b[-plus]|4-b]  hub:alice/rpi                     |",
        "alice      rpi         walt (other user)  rpi-[3-b[-plus]|4-b]  walt:alice/rpi                    |",
        "eve        future      custom registry    pc-x86-64             [Need server upgrade, version>=99]|",
        "eve        multi       custom registry    pc-x86-[64|32]        local:eve/multi                   |",
        "eve        rpi:v1      custom registry    rpi-[3-b[-plus]|4-b]  local:eve/rpi:v1                  |",
        "walt-test  dimg        docker daemon      pc-x86-64             docker:walt-test/dimg             |",
    ]);
    assert_text(&out, &want);

    // alice does not see her own images of the server; a keyword narrows.
    let out = run_tz(&alice, &["image", "search", "rpi"]);
    let want = golden(&[
        "User   Image name  Location         Compatibility         Clonable link   |",
        "-----  ----------  ---------------  --------------------  ----------------|",
        "alice  rpi         docker hub       rpi-[3-b[-plus]|4-b]  hub:alice/rpi   |",
        "eve    rpi:v1      custom registry  rpi-[3-b[-plus]|4-b]  local:eve/rpi:v1|",
    ]);
    assert_text(&out, &want);

    // No match: nothing on stdout.
    let out = run_tz(&carol, &["image", "search", "nothing-like-this"]);
    assert_text(&out, "");
}

#[test]
fn refusals_exit_non_zero_with_nothing_on_stdout() {
    let env = Env::start();
    let multi = tiny(&env.images, ImageConfig::amd64("pc-x86-64"), "multi");
    env.push_local("eve/multi", "latest", &multi);
    env.alice.clone_ok(&["local:eve/multi"]);

    let refusals: &[(&[&str], &str)] = &[
        (
            &["image", "show", "--names-only", "--all"],
            "options --names-only and --all are mutually exclusive",
        ),
        (
            &["image", "clone", "local:eve/multi"],
            "(use walt image clone --force local:eve/multi multi to overwrite it)",
        ),
        (
            &["image", "clone", "walt:alice/multi"],
            "already in your working set",
        ),
        (&["image", "clone", "nowhere:eve/multi"], "nowhere"),
        (&["image", "clone", "local:eve/absent"], "eve/absent"),
        (&["image", "remove", "absent"], "(see walt image show)"),
        (&["image", "rename", "absent", "x"], "(see walt image show)"),
        (
            &["image", "duplicate", "absent", "x"],
            "(see walt image show)",
        ),
        (&["image", "squash", "absent"], "(see walt image show)"),
        (&["image", "rename", "multi", "bad/name"], "bad/name"),
        (
            &["image", "publish", "--registry", "nosuch", "multi"],
            "nosuch",
        ),
        (&["image", "publish", "absent"], "absent"),
        (&["image", "cp", "absent:/etc/hostname", "/tmp/x"], "absent"),
    ];
    for (args, needle) in refusals {
        let out = env.alice.run(args);
        assert!(!out.success, "walt {args:?} succeeded:\n{out}");
        assert_ne!(out.code, Some(0), "{out}");
        assert_eq!(out.stdout, "", "walt {args:?} printed on stdout:\n{out}");
        assert!(
            out.stderr.starts_with("error: "),
            "walt {args:?}: not one error line:\n{out}"
        );
        assert!(
            out.stderr.contains(needle),
            "walt {args:?}: {needle:?} not in:\n{out}"
        );
    }
    // The clone hint is a command that works.
    let out = env
        .alice
        .run(&["image", "clone", "--force", "local:eve/multi", "multi"]);
    out.assert_success();
}
