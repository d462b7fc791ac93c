//! Content-addressed blobs: `blobs/sha256/<hex>`.

use std::fs;
use std::io;
use std::path::PathBuf;

use crate::Inner;
use crate::error::{Result, StoreError};
use crate::staging::{BlobWriter, Expected};
use crate::util::{check_digest, sha256_digest};

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
        // Without an expected digest, whether the blob is stored is only
        // known once it is hashed: then nothing is staged.
        let computed;
        let expected = match expected_digest {
            Some(d) => d,
            None => {
                computed = sha256_digest(bytes);
                if self.has_blob(&computed) {
                    return Ok(computed);
                }
                &computed
            }
        };
        let mut w = BlobWriter::plain(
            self,
            Expected {
                digest: Some(expected),
                size: None,
            },
        )?;
        w.write_chunk(bytes)?;
        w.finish()?.publish(self)
    }

    pub(crate) fn layer_path(&self, diff_id: &str) -> Result<PathBuf> {
        Ok(self.layers_dir().join(check_digest(diff_id)?).join("diff"))
    }

    pub(crate) fn has_layer(&self, diff_id: &str) -> bool {
        self.layer_path(diff_id).is_ok_and(|p| p.is_dir())
    }
}
