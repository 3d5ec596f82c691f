//! Embedded, persistent storage shared by the embedded broker and the
//! idempotency gate: redb files written through a group-commit thread.

mod group_commit;

pub use group_commit::GroupCommit;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("storage")]
    Failed(#[source] crate::error::Cause),
    #[error("cannot open {}", path.display())]
    Open {
        path: std::path::PathBuf,
        #[source]
        cause: crate::error::Cause,
    },
    #[error("storage is closed")]
    Closed,
}

pub(crate) fn failed(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StorageError {
    StorageError::Failed(crate::error::cause(e))
}

/// Opens (or creates) a redb file, creating its folder.
pub fn open_database(path: &std::path::Path) -> Result<redb::Database, StorageError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| StorageError::Open {
            path: dir.to_owned(),
            cause: crate::error::cause(e),
        })?;
    }
    redb::Database::create(path).map_err(|e| StorageError::Open {
        path: path.to_owned(),
        cause: crate::error::cause(e),
    })
}
