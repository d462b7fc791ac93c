//! With the `isal` feature (on by default), builds the small C layer over
//! ISA-L's inflate and links the library, both found through pkg-config
//! (`libisal.pc`, Debian: libisal-dev). Without the feature, gzip layers are
//! inflated with zlib-rs only and nothing here runs.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "isal")]
    isal();
}

#[cfg(feature = "isal")]
fn isal() {
    println!("cargo::rerun-if-changed=src/isal_shim.c");
    // pkg-config prints the link flags and watches its own variables.
    let Ok(lib) = pkg_config::Config::new().probe("libisal") else {
        println!(
            "cargo::error=ISA-L not found through pkg-config (libisal): install libisal-dev and pkg-config, or build with --no-default-features to inflate with zlib-rs"
        );
        return;
    };
    cc::Build::new()
        .file("src/isal_shim.c")
        .includes(&lib.include_paths)
        .warnings(true)
        .compile("walt_isal_shim");
}
