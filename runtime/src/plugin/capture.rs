//! A plugin's stdout and stderr: kept in memory and handed to the runtime's log after each call
//! (at most [`CAP`] bytes per call; the rest is dropped with a note).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

const CAP: usize = 64 << 10;

#[derive(Clone, Default)]
pub struct Captured {
    buf: Arc<Mutex<(Vec<u8>, bool)>>,
}

impl Captured {
    /// What the plugin wrote since the last call.
    pub fn take(&self) -> String {
        let mut g = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        let (bytes, cut) = std::mem::take(&mut *g);
        let mut s = String::from_utf8_lossy(&bytes).into_owned();
        if cut {
            s.push_str("\n[plugin output truncated]");
        }
        s
    }
}

impl IsTerminal for Captured {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Captured {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for Captured {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut g = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        let room = CAP.saturating_sub(g.0.len());
        let n = data.len().min(room);
        g.0.extend_from_slice(&data[..n]);
        g.1 |= n < data.len();
        Poll::Ready(Ok(data.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
