//! `walt help show|list` (WalT's help topics, written for this walt and
//! shipped in the binary), and what `walt advanced dump-*` prints: shell
//! completions and man pages generated from the clap definitions.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use clap::Subcommand;

/// The help topics, under WalT's names: (name, page).
pub const TOPICS: &[(&str, &str)] = &[
    ("help-intro", include_str!("../help/help-intro.md")),
    ("image-build", include_str!("../help/image-build.md")),
    ("image-cp", include_str!("../help/image-cp.md")),
    ("registries", include_str!("../help/registries.md")),
    (
        "shell-completion",
        include_str!("../help/shell-completion.md"),
    ),
    ("shells", include_str!("../help/shells.md")),
];

const TOPIC_NAMES: [&str; 6] = [
    "help-intro",
    "image-build",
    "image-cp",
    "registries",
    "shell-completion",
    "shells",
];

#[derive(Subcommand, Debug, Clone)]
pub enum HelpCommand {
    /// Display help about a given topic (default: help-intro).
    Show {
        /// The topic (see walt help list).
        #[arg(default_value = "help-intro", value_parser = TOPIC_NAMES)]
        topic: String,
    },
    /// Display the list of help topics.
    List,
}

/// The page of a topic.
pub fn page(topic: &str) -> Option<&'static str> {
    TOPICS.iter().find(|(n, _)| *n == topic).map(|(_, p)| *p)
}

/// The title of a page: its first non-empty line, without the `#`s (as
/// WalT's `walt help list` takes it).
fn title(page: &str) -> &str {
    page.split(['\n', '#'])
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

/// `walt help list`, as WalT prints it: one `<topic> -- <title>` line per
/// topic, sorted, names padded to the longest.
pub fn topic_list() -> String {
    let width = TOPICS.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let mut lines: Vec<String> = TOPICS
        .iter()
        .map(|(n, p)| format!("{n:<width$} -- {}", title(p)))
        .collect();
    lines.sort();
    let mut out = String::from("The following help topics are available:\n");
    for l in lines {
        out.push_str(&l);
        out.push('\n');
    }
    out
}

pub fn run(cmd: &HelpCommand) -> anyhow::Result<()> {
    let text = match cmd {
        HelpCommand::List => topic_list(),
        HelpCommand::Show { topic } => page(topic)
            .with_context(|| format!("no help topic '{topic}' (see walt help list)"))?
            .to_string(),
    };
    print_out(&text)
}

fn print_out(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        // A reader that went away (`walt help show | head`) is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("cannot write to stdout"),
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Shell {
    Bash,
    Zsh,
}

/// Completes image names after the image commands that take one of the
/// user's images first (asks the server: `walt image show --names-only`).
const BASH_DYNAMIC: &str = r#"
# walt: the names of your images after the commands that take one.
_walt_with_names() {
    local cur="${COMP_WORDS[COMP_CWORD]}"
    if [[ ${COMP_CWORD} -eq 3 && ${COMP_WORDS[1]} == image && ${cur} != -* ]]; then
        case "${COMP_WORDS[2]}" in
            shell|remove|rename|duplicate|squash|publish)
                local names
                names="$("${COMP_WORDS[0]}" image show --names-only </dev/null 2>/dev/null)"
                COMPREPLY=($(compgen -W "${names}" -- "${cur}"))
                return 0
                ;;
        esac
    fi
    _walt "$@"
}
if [[ "${BASH_VERSINFO[0]}" -eq 4 && "${BASH_VERSINFO[1]}" -ge 4 || "${BASH_VERSINFO[0]}" -gt 4 ]]; then
    complete -F _walt_with_names -o nosort -o bashdefault -o default walt
else
    complete -F _walt_with_names -o bashdefault -o default walt
fi
"#;

/// The completion script for `shell`.
pub fn completion(mut cmd: clap::Command, shell: Shell) -> Vec<u8> {
    let mut buf = Vec::new();
    match shell {
        Shell::Bash => {
            clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, "walt", &mut buf);
            buf.extend_from_slice(BASH_DYNAMIC.as_bytes());
        }
        Shell::Zsh => {
            clap_complete::generate(clap_complete::Shell::Zsh, &mut cmd, "walt", &mut buf);
        }
    }
    buf
}

/// `walt advanced dump-{bash,zsh}-autocomplete`.
pub fn dump_completion(cmd: clap::Command, shell: Shell) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(&completion(cmd, shell))
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

/// `walt advanced dump-man-pages DIR`: one page per command (walt.1,
/// walt-image.1, walt-image-clone.1, ...).
pub fn dump_man_pages(cmd: clap::Command, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("cannot write the man pages into {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_match_the_pages() {
        let names: Vec<&str> = TOPICS.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, TOPIC_NAMES);
        for (n, p) in TOPICS {
            assert!(p.starts_with("# "), "{n}: a page starts with its title");
            assert!(!title(p).is_empty(), "{n}");
        }
    }

    #[test]
    fn list_is_aligned_and_sorted() {
        let list = topic_list();
        let mut lines = list.lines();
        assert_eq!(
            lines.next(),
            Some("The following help topics are available:")
        );
        let rest: Vec<&str> = lines.collect();
        assert_eq!(rest.len(), TOPICS.len());
        let width = "shell-completion".len();
        for l in &rest {
            assert_eq!(l.find(" -- "), Some(width), "{l:?}");
        }
        assert!(rest[0].starts_with("help-intro "));
        assert!(rest.is_sorted());
    }

    #[test]
    fn title_is_the_first_heading() {
        assert_eq!(title("\n# Building images\n\ntext"), "Building images");
    }
}
