//! Tasks owned by what started them: work begun on behalf of an upload (reading the
//! index, sending packs, copying old packs, writing index filters) stops when the
//! upload is given up, instead of running on unattended.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::task::{JoinError, JoinHandle};

/// A task on the runtime that is aborted when this handle is dropped (a plain
/// [`JoinHandle`] lets it run on). Awaited, it gives the task's output.
#[must_use = "dropping it stops the task"]
pub struct OwnedTask<T>(JoinHandle<T>);

impl<T: Send + 'static> OwnedTask<T> {
    /// Starts `work` on the runtime.
    pub fn spawn(work: impl Future<Output = T> + Send + 'static) -> OwnedTask<T> {
        OwnedTask(tokio::spawn(work))
    }
}

impl<T> Future for OwnedTask<T> {
    type Output = Result<T, JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for OwnedTask<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// Work that sets `flag` 50 ms after it starts.
    fn later(flag: &Arc<AtomicBool>) -> impl Future<Output = ()> + Send + 'static {
        let flag = flag.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            flag.store(true, Ordering::SeqCst);
        }
    }

    // On a paused clock, which advances only when every task waits: no timer fires
    // early or late on a loaded machine.
    #[tokio::test(start_paused = true)]
    async fn dropping_the_handle_stops_the_task_and_what_it_owns() {
        let (outer_ran, inner_ran) = (Arc::new(AtomicBool::new(false)), Arc::default());
        let inner = OwnedTask::spawn(later(&inner_ran));
        let outer = OwnedTask::spawn({
            let outer = later(&outer_ran);
            async move {
                outer.await;
                inner.await.expect("inner task");
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(outer);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!outer_ran.load(Ordering::SeqCst), "the dropped task ran on");
        assert!(
            !inner_ran.load(Ordering::SeqCst),
            "a task owned by the dropped one ran on"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn awaited_it_gives_the_output() {
        let ran = Arc::new(AtomicBool::new(false));
        OwnedTask::spawn(later(&ran)).await.expect("task");
        assert!(ran.load(Ordering::SeqCst));
        assert_eq!(OwnedTask::spawn(async { 7 }).await.expect("task"), 7);
    }
}
