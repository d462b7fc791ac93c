//! Content-addressed blobs: `blobs/sha256/<hex>`.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::Inner;
use crate::error::{IoContext, Result, StoreError};
use crate::util::{TmpPath, check_digest, fsync_dir, sha256_digest, unique_name};

impl Inner {
    pub(crate) fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.blobs_dir().join(check_digest(digest)?))
    }

    pub(crate) fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).is_ok_and(|p| p.is_file())
    }

    pub(crate) fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(digest)?;
        fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::BlobNotFound(digest.to_string()),
            _ => StoreError::io_path(&format!("reading blob {digest} from"), &path, e),
        })
    }

    pub(crate) fn put_blob(&self, expected_digest: Option<&str>, bytes: &[u8]) -> Result<String> {
        let digest = sha256_digest(bytes);
        if let Some(expected) = expected_digest {
            check_digest(expected)?;
            if expected != digest {
                return Err(StoreError::DigestMismatch {
                    digest: expected.to_string(),
                    actual: digest,
                });
            }
        }
        let dest = self.blob_path(&digest)?;
        if dest.is_file() {
            return Ok(digest);
        }
        let tmp = TmpPath::new(self.tmp_dir().join(unique_name("blob")));
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(tmp.path())
            .ctx("creating staging file", tmp.path())?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .ctx("writing staging file", tmp.path())?;
        drop(f);
        fs::rename(tmp.path(), &dest).ctx(&format!("publishing blob {digest} as"), &dest)?;
        tmp.keep();
        fsync_dir(&self.blobs_dir())?;
        tracing::debug!(%digest, size = bytes.len(), "blob stored");
        Ok(digest)
    }

    pub(crate) fn layer_path(&self, diff_id: &str) -> Result<PathBuf> {
        Ok(self.layers_dir().join(check_digest(diff_id)?).join("diff"))
    }

    pub(crate) fn has_layer(&self, diff_id: &str) -> bool {
        self.layer_path(diff_id).is_ok_and(|p| p.is_dir())
    }
}
