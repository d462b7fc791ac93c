//! Sessions that open an image in a sandbox (`shell`, `cp`): the lock that
//! allows one modifying session per image, the session's staging
//! directories, and saving what changed as a new layer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use walt_container::{Job, Spec};
use walt_core::ImageName;
use walt_core::oci::ImageConfig;
use walt_store::{CommitOutcome, ImageRecord, ImportGuard, SessionDir, Store};

use crate::State;
use crate::error::ServiceError;
use crate::images::blocking;

/// Who holds each image being modified, by image; shells open, by user.
#[derive(Default)]
pub struct Locks {
    held: Mutex<HashMap<ImageName, String>>,
    shells: Mutex<HashMap<String, u32>>,
}

impl Locks {
    /// Takes the lock of `name` for `holder` (e.g. "a shell of alice since
    /// 10:42:07"), or says who holds it.
    pub fn acquire(
        self: &Arc<Self>,
        name: &ImageName,
        holder: String,
    ) -> Result<LockGuard, ServiceError> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = held.get(name) {
            return Err(busy(name, h));
        }
        held.insert(name.clone(), holder);
        Ok(LockGuard {
            locks: self.clone(),
            name: name.clone(),
        })
    }
}

impl Locks {
    /// Counts a shell of `user`, refused when `user` already has `max`
    /// open (`limits.shells-per-user`).
    pub fn open_shell(self: &Arc<Self>, user: &str, max: u32) -> Result<ShellSlot, ServiceError> {
        let mut shells = self.shells.lock().unwrap_or_else(|e| e.into_inner());
        let n = shells.entry(user.to_string()).or_insert(0);
        if *n >= max {
            return Err(ServiceError::FailedPrecondition(format!(
                "cannot open a shell: {user} already has {n} shells open, the limit \
                 (limits.shells-per-user in the server configuration): exit one first"
            )));
        }
        *n += 1;
        Ok(ShellSlot {
            locks: self.clone(),
            user: user.to_string(),
        })
    }
}

/// One of a user's open shells, counted until dropped.
pub struct ShellSlot {
    locks: Arc<Locks>,
    user: String,
}

impl Drop for ShellSlot {
    fn drop(&mut self) {
        let mut shells = self.locks.shells.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = shells.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                shells.remove(&self.user);
            }
        }
    }
}

fn busy(name: &ImageName, holder: &str) -> ServiceError {
    ServiceError::FailedPrecondition(format!(
        "image '{}' is being modified by {holder}: try again when it is done",
        name.short()
    ))
}

/// Releases an image lock when dropped.
pub struct LockGuard {
    locks: Arc<Locks>,
    name: ImageName,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.locks
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.name);
    }
}

/// `HH:MM:SS` (UTC) of now, for lock holders.
pub(crate) fn clock() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// An image opened for a sandbox: its record, the staging directories
/// (upper, work, mount point) and, for modifying sessions, the lock.
pub struct Session {
    pub state: Arc<State>,
    pub rec: ImageRecord,
    pub config: ImageConfig,
    /// Removed (off the async threads) when the session is dropped.
    dir: Option<SessionDir>,
    layers: Vec<std::path::PathBuf>,
    /// Keeps gc from removing the layers the sandbox mounts (an image
    /// removed or replaced meanwhile), until the session is dropped.
    import: Option<ImportGuard>,
    _lock: Option<LockGuard>,
}

impl Session {
    /// Opens `image` of `user`'s working set. `what` describes the session
    /// for others ("a shell", "walt image cp"); `modifying` takes the lock.
    pub async fn open(
        state: &Arc<State>,
        user: &str,
        image: &str,
        what: &str,
        modifying: bool,
    ) -> Result<Session, ServiceError> {
        let name = ImageName::parse_user(user, image)?;
        let lock = if modifying {
            Some(
                state
                    .locks
                    .acquire(&name, format!("{what} of {user} (since {})", clock()))?,
            )
        } else {
            None
        };
        let st = state.clone();
        let (rec, config, dir, layers, import) = blocking(move || {
            let store: &Store = &st.store;
            let rec = store.get_image(&name)?.ok_or_else(|| {
                ServiceError::NotFound(format!(
                    "image '{}' not found in your working set (see walt image show)",
                    name.short()
                ))
            })?;
            let config: ImageConfig = serde_json::from_slice(&store.read_blob(&rec.config_digest)?)
                .map_err(|e| {
                    ServiceError::Internal(format!(
                        "image '{}': cannot read its configuration: {e}",
                        name.short()
                    ))
                })?;
            let import = store.begin_import();
            let layers = store.layer_dirs(&rec)?;
            let dir = store.session_dir("session")?;
            Ok((rec, config, dir, layers, import))
        })
        .await?;
        Ok(Session {
            state: state.clone(),
            rec,
            config,
            dir: Some(dir),
            layers,
            import: Some(import),
            _lock: lock,
        })
    }

    fn dir(&self) -> &SessionDir {
        self.dir
            .as_ref()
            .expect("session directory present until drop")
    }

    /// The session's upper directory (in the store's `tmp/`).
    pub fn upper(&self) -> std::path::PathBuf {
        self.dir().upper()
    }

    pub fn short(&self) -> String {
        self.rec.name.short()
    }

    /// The sandbox specification running `job` on this session's mount.
    pub fn spec(&self, job: Job) -> Spec {
        Spec {
            layers: self.layers.clone(),
            upper: self.dir().upper(),
            work: self.dir().work(),
            merged: self.dir().merged(),
            job,
        }
    }

    /// Checks the image's binaries can run here (qemu-user for foreign
    /// architectures).
    pub fn check_runnable(&self) -> Result<(), ServiceError> {
        walt_container::check_emulation(&self.config.architecture, self.config.variant.as_deref())
            .map_err(|e| ServiceError::FailedPrecondition(format!("image '{}': {e}", self.short())))
    }

    /// Whether the sandbox left changes (after removing what the sandbox
    /// itself created: the missing mount points of the image, made only for
    /// a shell, `ran`; a copy into the image makes none, and an empty `/proc`
    /// it brings is a change).
    pub async fn changed(&self, ran: bool) -> Result<bool, ServiceError> {
        let upper = self.dir().upper();
        blocking(move || {
            if ran {
                walt_container::clean_session_artifacts(&upper);
            }
            Ok(!Store::upper_is_empty(&upper)?)
        })
        .await
    }

    /// Saves the changes as one new layer, recorded as `target` (replacing
    /// it when `replace`).
    pub async fn save(
        &self,
        target: ImageName,
        replace: bool,
        created_by: String,
    ) -> Result<CommitOutcome, ServiceError> {
        let (store, rec, upper) = (
            self.state.store.clone(),
            self.rec.clone(),
            self.dir().upper(),
        );
        let started = std::time::Instant::now();
        let out = blocking(move || {
            Ok(store.commit_layer(&rec, &upper, &target, replace, &created_by)?)
        })
        .await?;
        tracing::info!(
            image = %self.rec.name,
            diff_id = %out.diff_id,
            layer_size = out.layer_size,
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "session saved"
        );
        Ok(out)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        release(self.dir.take(), self.import.take());
    }
}

/// Removes a session directory and drops an import guard off the async
/// threads: a discarded upper directory can be large, and the last import
/// guard runs a deferred gc.
pub(crate) fn release(dir: Option<SessionDir>, import: Option<ImportGuard>) {
    let cleanup = move || {
        if let Some(dir) = dir {
            let path = dir.path().to_path_buf();
            drop(dir);
            // Processes of a killed sandbox may still be exiting.
            for _ in 0..20 {
                if !path.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
                if let Err(e) = walt_store::remove_tree(&path) {
                    tracing::debug!(error = %e, "session directory not removed yet");
                }
            }
        }
        drop(import);
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn_blocking(cleanup);
        }
        Err(_) => cleanup(),
    }
}

/// Stops a sandbox: SIGTERM (it kills its namespace and waits for it),
/// then SIGKILL if it has not exited within 5 s. Returns once it is reaped.
pub async fn stop_sandbox(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        // Our own child, not reaped yet: the pid is still its.
        if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        if tokio::time::timeout(std::time::Duration::from_secs(5), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}
