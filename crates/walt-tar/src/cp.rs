//! The `cp -r` landing rule, shared by every `cp`-like extraction.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where the top entry `top` of an archive lands for the destination
/// `dest` (shown to the user as `shown`), as `cp -r` / `scp` do: inside
/// `dest` when it is a directory, else at `dest` itself (its parent must
/// exist). Returns the directory to extract into and the name the top
/// entry takes there.
pub fn cp_landing(
    shown: &str,
    dest: &Path,
    top: &OsStr,
    top_is_dir: bool,
) -> Result<(PathBuf, OsString)> {
    let target = match fs::metadata(dest) {
        Ok(m) if m.is_dir() => dest.join(top),
        Ok(_) if shown.ends_with('/') => {
            return Err(Error::Landing(format!("{shown}: Not a directory")));
        }
        Ok(_) => dest.to_path_buf(),
        Err(_) if shown.ends_with('/') => {
            return Err(Error::Landing(format!("{shown}: Not a directory")));
        }
        Err(_) => match parent_of(dest).map(fs::metadata) {
            Some(Ok(pm)) if pm.is_dir() => dest.to_path_buf(),
            _ => {
                return Err(Error::Landing(format!(
                    "{shown}: No such file or directory"
                )));
            }
        },
    };
    match fs::metadata(&target) {
        Ok(m) if top_is_dir && !m.is_dir() => {
            return Err(Error::Landing(format!(
                "cannot overwrite non-directory '{}' with directory '{}'",
                target.display(),
                Path::new(top).display()
            )));
        }
        // `cp` would write into a device or a fifo; replacing it (a client's
        // /dev/null, say) would be worse than refusing.
        Ok(m) if !m.is_dir() && !m.is_file() => {
            return Err(Error::Landing(format!(
                "will not replace '{}': it is not a regular file (a device, fifo or socket)",
                target.display()
            )));
        }
        Ok(m) if !top_is_dir && m.is_dir() => {
            return Err(Error::Landing(format!(
                "cannot overwrite directory '{}' with non-directory '{}'",
                target.display(),
                Path::new(top).display()
            )));
        }
        _ => {}
    }
    let name = match target.file_name() {
        Some(n) => n.to_os_string(),
        None => {
            return Err(Error::Landing(format!(
                "{shown}: cannot copy to this destination"
            )));
        }
    };
    let dir = parent_of(&target).unwrap_or(Path::new(".")).to_path_buf();
    Ok((dir, name))
}

fn parent_of(p: &Path) -> Option<&Path> {
    match p.parent() {
        Some(q) if q.as_os_str().is_empty() => Some(Path::new(".")),
        other => other,
    }
}
