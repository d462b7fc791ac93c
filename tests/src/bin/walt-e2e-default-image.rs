//! The real default images for the tests (see `walt_e2e::default_images`),
//! for `tests/run` and by hand:
//!
//! - `walt-e2e-default-image build RECIPE...`: builds each recipe's layout
//!   when the cache has none for its current inputs; prints the layouts;
//! - `walt-e2e-default-image cached RECIPE`: prints the layout and exits 0
//!   when it is cached for the current inputs, exits 1 otherwise;
//! - `walt-e2e-default-image recipes`: the recipes of `images/`.

use std::process::ExitCode;

use walt_e2e::default_images::{cached, default_image, recipes};

fn usage() -> ExitCode {
    eprintln!("usage: walt-e2e-default-image build RECIPE... | cached RECIPE | recipes");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("build") if args.len() > 1 => {
            for r in &args[1..] {
                match default_image(r) {
                    Ok(img) => println!("{}", img.layout.display()),
                    Err(e) => {
                        eprintln!("Cannot build the {r} default image: {e:#}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Some("cached") if args.len() == 2 => match cached(&args[1]) {
            Ok(Some(img)) => {
                println!("{}", img.layout.display());
                ExitCode::SUCCESS
            }
            Ok(None) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("{e:#}");
                ExitCode::from(2)
            }
        },
        Some("recipes") if args.len() == 1 => {
            for r in recipes() {
                println!("{r}");
            }
            ExitCode::SUCCESS
        }
        _ => usage(),
    }
}
