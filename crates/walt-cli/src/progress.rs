//! Per-blob progress bars on a terminal (stderr); plain message lines
//! otherwise. Shared by clone and publish.

use std::collections::HashMap;
use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use walt_proto::v1 as pb;

pub struct Bars {
    bars: Option<(MultiProgress, HashMap<String, ProgressBar>)>,
    style: ProgressStyle,
    /// What a bar says when its blob needed no transfer, and when it is done.
    cached: &'static str,
    done: &'static str,
}

impl Bars {
    pub fn new(cached: &'static str, done: &'static str) -> Self {
        let bars = std::io::stderr().is_terminal().then(|| {
            (
                MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
                HashMap::new(),
            )
        });
        let style = ProgressStyle::with_template(
            "{prefix:>12} [{bar:30}] {bytes:>10}/{total_bytes:<10} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        Self {
            bars,
            style,
            cached,
            done,
        }
    }

    /// A line for the user, above the bars (its control characters shown
    /// escaped: it may quote a registry).
    pub fn message(&self, text: &str) {
        let text = walt_core::text::neutralize(text);
        match &self.bars {
            Some((mp, _)) => {
                let _ = mp.println(text);
            }
            None => eprintln!("{text}"),
        }
    }

    pub fn update(&mut self, p: &pb::LayerProgress) {
        let Some((mp, map)) = &mut self.bars else {
            return;
        };
        let bar = map.entry(p.digest.clone()).or_insert_with(|| {
            let b = mp.add(ProgressBar::new(p.total));
            b.set_style(self.style.clone());
            let hex = p.digest.strip_prefix("sha256:").unwrap_or(&p.digest);
            b.set_prefix(
                walt_core::text::one_line(&hex.chars().take(12).collect::<String>()).into_owned(),
            );
            b
        });
        bar.set_position(p.done);
        if p.complete {
            bar.finish_with_message(if p.cached { self.cached } else { self.done });
        }
    }

    /// Removes the bars (before the result line or an error).
    pub fn clear(&self) {
        if let Some((mp, _)) = &self.bars {
            let _ = mp.clear();
        }
    }
}
