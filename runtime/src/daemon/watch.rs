//! Watches files (plugins, the config) and source trees (`sluice dev`) and
//! reports changes once they have settled.

use notify_debouncer_full::notify::{self, EventKind, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{new_debouncer, DebounceEventResult, Debouncer, RecommendedCache};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

/// Quiet time after the last write before a change is reported: a `.wasm`
/// being copied into place is not read half-written.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot start the file watcher")]
    Start(#[source] notify::Error),
    #[error("cannot watch {}", path.display())]
    Watch { path: PathBuf, source: notify::Error },
}

/// A debounced file watcher whose changes arrive on a tokio channel.
pub struct FileWatcher {
    debouncer: Debouncer<RecommendedWatcher, RecommendedCache>,
    watched: BTreeSet<PathBuf>,
}

/// The absolute form of `path` with its folder's symlinks resolved, as
/// change events name it. The file itself need not exist.
pub fn normalize(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (absolute.parent(), absolute.file_name()) {
        (Some(dir), Some(name)) => dir.canonicalize().map(|d| d.join(name)).unwrap_or(absolute),
        _ => absolute,
    }
}

impl FileWatcher {
    pub fn new() -> Result<(Self, mpsc::UnboundedReceiver<Vec<PathBuf>>), WatchError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| match result {
            Ok(events) => {
                // Reads (an open, a close without writing) are not changes:
                // reloading a file opens it.
                let paths: BTreeSet<PathBuf> = events
                    .into_iter()
                    .filter(|e| !matches!(e.event.kind, EventKind::Access(_)))
                    .flat_map(|e| e.event.paths)
                    .collect();
                if !paths.is_empty() {
                    let _ = tx.send(paths.into_iter().collect());
                }
            }
            Err(errors) => {
                for e in errors {
                    tracing::warn!("file watcher: {e}");
                }
            }
        })
        .map_err(WatchError::Start)?;
        Ok((
            Self {
                debouncer,
                watched: BTreeSet::new(),
            },
            rx,
        ))
    }

    /// Watches the folder of `file`: editors and `cp` often replace a file
    /// (a new inode), which a watch on the file itself would miss.
    pub fn watch_file(&mut self, file: &Path) -> Result<(), WatchError> {
        let file = normalize(file);
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        self.watch(&dir, RecursiveMode::NonRecursive)
    }

    /// Watches everything under `dir`.
    pub fn watch_tree(&mut self, dir: &Path) -> Result<(), WatchError> {
        self.watch(&normalize(dir), RecursiveMode::Recursive)
    }

    fn watch(&mut self, dir: &Path, mode: RecursiveMode) -> Result<(), WatchError> {
        if self.watched.contains(dir) {
            return Ok(());
        }
        self.debouncer.watch(dir, mode).map_err(|source| WatchError::Watch {
            path: dir.to_path_buf(),
            source,
        })?;
        self.watched.insert(dir.to_path_buf());
        Ok(())
    }
}
