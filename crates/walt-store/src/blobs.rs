//! Content-addressed blobs: `blobs/sha256/<hex>`.

use std::fs;
use std::io;
use std::path::PathBuf;

use crate::Inner;
use crate::error::{Result, StoreError};
use crate::staging::{BlobWriter, Expected};
use crate::util::sha256_digest;
use walt_core::Digest;

impl Inner {
    pub(crate) fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join(digest.hex())
    }

    pub(crate) fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    pub(crate) fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::BlobNotFound(digest.clone()),
            _ => StoreError::io_path(&format!("reading blob {digest} from"), &path, e),
        })
    }

    pub(crate) fn put_blob(
        &self,
        expected_digest: Option<&Digest>,
        bytes: &[u8],
    ) -> Result<Digest> {
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

    pub(crate) fn layer_path(&self, diff_id: &Digest) -> PathBuf {
        self.layers_dir().join(diff_id.hex()).join("diff")
    }

    pub(crate) fn has_layer(&self, diff_id: &Digest) -> bool {
        self.layer_path(diff_id).is_dir()
    }
}
