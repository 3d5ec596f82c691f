//! Group commit: callers hand small write jobs to one writer thread, which
//! runs whatever has queued up in a single fsync'd transaction and answers
//! each caller only after that commit. Under load, one fsync serves hundreds
//! of writes; a caller that got `Ok` knows its write survives a crash.

use super::{failed, StorageError};
use redb::{Database, WriteTransaction};
use std::sync::{mpsc, Arc, Mutex};
use tokio::sync::oneshot;

/// Upper bound of jobs folded into one transaction.
const MAX_BATCH: usize = 1024;

/// Called with the commit's result once the batch is committed (or not).
type Finish = Box<dyn FnOnce(Result<(), StorageError>) + Send>;
type Work = Box<dyn FnOnce(&WriteTransaction) -> Finish + Send>;

pub struct GroupCommit {
    jobs: Mutex<Option<mpsc::Sender<Work>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl GroupCommit {
    /// Starts the writer thread for `db`.
    pub fn start(db: Arc<Database>, name: &str) -> Result<Self, StorageError> {
        let (tx, rx) = mpsc::channel::<Work>();
        let thread = std::thread::Builder::new()
            .name(format!("sluice-{name}-writer"))
            .spawn(move || writer(&db, &rx))
            .map_err(failed)?;
        Ok(Self {
            jobs: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Runs `job` inside the next transaction and returns its result once
    /// the transaction is committed. A job's error does not abort the batch:
    /// jobs check before they write.
    pub async fn run<R, F>(&self, job: F) -> Result<R, StorageError>
    where
        R: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<R, StorageError> + Send + 'static,
    {
        self.enqueue(job)?.await
    }

    /// Queues `job` now (before this returns, so a `close` after it still
    /// commits it) and gives a future of its committed result.
    pub fn enqueue<R, F>(
        &self,
        job: F,
    ) -> Result<impl std::future::Future<Output = Result<R, StorageError>> + Send + 'static, StorageError>
    where
        R: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<R, StorageError> + Send + 'static,
    {
        let (done, wait) = oneshot::channel();
        let work: Work = Box::new(move |txn| {
            let result = job(txn);
            Box::new(move |commit: Result<(), StorageError>| {
                let _ = done.send(commit.and(result));
            })
        });
        let jobs = self.jobs.lock().map_err(|_| StorageError::Closed)?;
        jobs.as_ref()
            .ok_or(StorageError::Closed)?
            .send(work)
            .map_err(|_| StorageError::Closed)?;
        Ok(async move { wait.await.map_err(|_| StorageError::Closed)? })
    }

    /// Stops accepting jobs, lets queued ones commit and waits for the
    /// writer to finish (the file is free for another process afterwards,
    /// once the other handles are dropped).
    pub fn close(&self) {
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.take();
        }
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

fn writer(db: &Database, rx: &mpsc::Receiver<Work>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(work) => batch.push(work),
                Err(_) => break,
            }
        }
        match db.begin_write() {
            Ok(txn) => {
                let finishers: Vec<Finish> = batch.into_iter().map(|work| work(&txn)).collect();
                let commit = txn.commit().map_err(failed);
                if let Err(e) = &commit {
                    tracing::error!("commit failed: {}", crate::error::Report(e));
                }
                for finish in finishers {
                    finish(commit.clone());
                }
            }
            Err(e) => {
                tracing::error!("cannot start a write transaction: {e}");
                // The jobs never ran: their callers see the error.
                drop(batch);
            }
        }
    }
}
