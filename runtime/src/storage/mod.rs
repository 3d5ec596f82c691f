//! Embedded, persistent storage shared by the embedded broker and the
//! idempotency gate: redb files written through a group-commit thread.

mod group_commit;

pub use group_commit::GroupCommit;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("storage: {0}")]
    Failed(String),
    #[error("storage is closed")]
    Closed,
}

pub(crate) fn failed<E: std::fmt::Display>(e: E) -> StorageError {
    StorageError::Failed(e.to_string())
}

/// Opens (or creates) a redb file, creating its folder.
pub fn open_database(path: &std::path::Path) -> Result<redb::Database, StorageError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| StorageError::Failed(format!("{}: {e}", dir.display())))?;
    }
    redb::Database::create(path).map_err(|e| StorageError::Failed(format!("{}: {e}", path.display())))
}
