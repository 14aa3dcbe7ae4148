//! Socket writes of one scheduler round, coalesced.
//!
//! The Raft thread answers a whole committed batch at once: tens of request
//! tasks become ready together, and many of them share an HTTP/2
//! connection. Each one hands its response to the connection's task and
//! wakes it, and tokio runs a task woken that way next, before the other
//! request tasks (its LIFO slot, which keeps a lone client's answer fast).
//! So the connection wrote each response on its own: one `writev`, and on
//! loopback the receiver's whole TCP input path with it, per response.
//!
//! [`Coalesced`] makes the first write of a burst yield once, the way
//! [`tokio::task::yield_now`] does: the connection's task is woken again
//! only when its worker has run every task that was ready meanwhile. The
//! responses those tasks produced join the same write. Nothing waits on a
//! timer: a lone response costs one more poll of the connection and leaves
//! as soon as its worker has nothing else to run. grpc-go (etcd's server)
//! batches the same way: its writer flushes when its queue is empty.

use std::future::Future;
use std::io::IoSlice;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// An accepted connection whose writes wait for the end of the round.
#[derive(Debug)]
pub struct Coalesced<T> {
    inner: T,
    /// The yield of the burst under way, until its wake has come.
    waiting: Option<Arc<Turn>>,
    /// The burst has yielded: writes go through until the next flush.
    open: bool,
}

/// The wake that ends a burst's yield, and whether it came.
#[derive(Debug)]
struct Turn {
    came: AtomicBool,
    task: Waker,
}

impl Wake for Turn {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.came.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl<T> Coalesced<T> {
    pub fn new(inner: T) -> Coalesced<T> {
        Coalesced {
            inner,
            waiting: None,
            open: false,
        }
    }

    /// Ready once this burst has let the round's other tasks run.
    fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.open {
            return Poll::Ready(());
        }
        if let Some(turn) = &self.waiting {
            if turn.came.load(Ordering::Acquire) {
                self.waiting = None;
                self.open = true;
                return Poll::Ready(());
            }
            // Polled for another reason (a read, another response): the
            // pending wake still reaches this task.
            if turn.task.will_wake(cx.waker()) {
                return Poll::Pending;
            }
        }
        let turn = Arc::new(Turn {
            came: AtomicBool::new(false),
            task: cx.waker().clone(),
        });
        let waker = Waker::from(turn.clone());
        // Outside a runtime, yield_now wakes at once: the write then only
        // takes one more poll.
        match pin!(tokio::task::yield_now()).poll(&mut Context::from_waker(&waker)) {
            Poll::Ready(()) => {
                self.open = true;
                Poll::Ready(())
            }
            Poll::Pending => {
                self.waiting = Some(turn);
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.poll_turn(cx));
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.poll_turn(cx));
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    /// Ends the burst: the next write yields again.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        self.open = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for Coalesced<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::AsyncWriteExt;

    /// Records each write it is given, as it is given.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<String>>>);

    impl Log {
        fn push(&self, s: String) {
            self.0.lock().unwrap().push(s);
        }
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }

    impl AsyncWrite for Log {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.push(format!("write {}", String::from_utf8_lossy(buf)));
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_burst_waits_for_the_tasks_already_ready_then_goes_out_whole() {
        let log = Log::default();
        let mut io = Coalesced::new(log.clone());
        // Ready before the write starts: they run first.
        let others: Vec<_> = (0..3)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.push(format!("task {i}")) })
            })
            .collect();
        io.write_all(b"a").await.unwrap();
        io.write_all(b"b").await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(
            log.take(),
            ["task 0", "task 1", "task 2", "write a", "write b"],
            "the burst yields once, before its first write only"
        );
        for t in others {
            t.await.unwrap();
        }

        // After a flush, the next burst yields again.
        let late = {
            let log = log.clone();
            tokio::spawn(async move { log.push("late task".into()) })
        };
        io.write_all(b"c").await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(log.take(), ["late task", "write c"]);
        late.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_byte_arrives_in_order_over_a_real_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let writer = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let mut io = Coalesced::new(sock);
            for i in 0..2000u32 {
                io.write_all(&i.to_be_bytes()).await.unwrap();
                if i % 7 == 0 {
                    io.flush().await.unwrap();
                }
            }
            io.shutdown().await.unwrap();
        });
        let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut sock, &mut got)
            .await
            .unwrap();
        writer.await.unwrap();
        let want: Vec<u8> = (0..2000u32).flat_map(|i| i.to_be_bytes()).collect();
        assert_eq!(got, want);
    }
}
