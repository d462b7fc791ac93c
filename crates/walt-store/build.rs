//! Builds the small C layer over ISA-L's inflate when the library is
//! installed (Debian: libisal-dev); without it, gzip layers are inflated
//! with zlib-rs only. `WALT_NO_ISAL=1` forces the latter.

use std::path::Path;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(walt_isal)");
    println!("cargo::rerun-if-changed=src/isal_shim.c");
    println!("cargo::rerun-if-env-changed=WALT_NO_ISAL");
    let header = Path::new("/usr/include/isa-l/igzip_lib.h");
    println!("cargo::rerun-if-changed={}", header.display());
    if std::env::var_os("WALT_NO_ISAL").is_some_and(|v| v == "1") {
        return;
    }
    if !header.exists() {
        println!(
            "cargo::warning=ISA-L not found (apt-get install libisal-dev): gzip layers will be inflated with zlib-rs, ~1.5x slower"
        );
        return;
    }
    cc::Build::new()
        .file("src/isal_shim.c")
        .warnings(true)
        .compile("walt_isal_shim");
    println!("cargo::rustc-link-lib=isal");
    println!("cargo::rustc-cfg=walt_isal");
}
