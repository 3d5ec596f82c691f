//! A plugin's stderr: the last few KiB are kept (for the trap reason, e.g. a
//! Rust panic message), older bytes are dropped, and writing never fails, so
//! a chatty plugin can neither trap on a full pipe nor grow host memory.
//! Cleared before every message, so one message's output never shows up in
//! another message's failure reason.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// How much of a plugin's stderr is kept.
pub const STDERR_KEPT: usize = 4096;
/// Largest write permit handed to the guest at once.
const PERMIT: usize = 64 << 10;

#[derive(Clone, Default)]
pub struct StderrTail {
    kept: Arc<Mutex<VecDeque<u8>>>,
}

impl StderrTail {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets what was written (the next message starts empty).
    pub fn clear(&self) {
        if let Ok(mut kept) = self.kept.lock() {
            kept.clear();
        }
    }

    /// The last bytes written since the last `clear`.
    pub fn contents(&self) -> Vec<u8> {
        self.kept
            .lock()
            .map(|k| k.iter().copied().collect())
            .unwrap_or_default()
    }

    fn push(&self, bytes: &[u8]) {
        let Ok(mut kept) = self.kept.lock() else { return };
        let tail = &bytes[bytes.len().saturating_sub(STDERR_KEPT)..];
        let overflow = (kept.len() + tail.len()).saturating_sub(STDERR_KEPT);
        let drop = overflow.min(kept.len());
        kept.drain(..drop);
        kept.extend(tail);
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for StderrTail {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for StderrTail {
    async fn ready(&mut self) {}
}

impl AsyncWrite for StderrTail {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for StderrTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StderrTail {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_tail_and_never_fails() {
        let mut tail = StderrTail::new();
        for _ in 0..100 {
            tail.write(bytes::Bytes::from(vec![b'a'; 300])).unwrap();
        }
        tail.write(bytes::Bytes::from_static(b"last line\n")).unwrap();
        let kept = tail.contents();
        assert_eq!(kept.len(), STDERR_KEPT);
        assert!(kept.ends_with(b"last line\n"));
        tail.write(bytes::Bytes::from(vec![b'b'; 3 * STDERR_KEPT])).unwrap();
        assert_eq!(tail.contents(), vec![b'b'; STDERR_KEPT]);
        tail.clear();
        assert!(tail.contents().is_empty());
    }
}
