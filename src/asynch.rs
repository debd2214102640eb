//! The async core and the blocking wrapper over it.
//!
//! The entry points that wait for a device (creating a wgpu backend, preparing a layer, a
//! forward, read-backs) are `async fn`s; the blocking API of the crate is [`block_on`] over
//! them. Natively that waits with `pollster`. On wasm32, where the browser's event loop must
//! run for anything to finish, nothing may block: [`block_on`] polls once and answers
//! [`Error::WouldBlock`] instead of waiting, so the blocking API still works where it does not
//! have to wait (the CPU backend, whose futures are ready at once) and names the async entry
//! point to use where it would.

use std::future::Future;
#[cfg(target_arch = "wasm32")]
use std::task::{Context, Poll, Waker};

use crate::error::{Error, Result};

/// Runs `fut` to completion and returns its output; `what` names the blocking call (for the
/// error on wasm32).
///
/// Natively this blocks the calling thread until `fut` is ready. On wasm32 it polls `fut`
/// once: a future that is not ready at once gives [`Error::WouldBlock`], never a wait.
pub fn block_on<T>(what: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
    match poll_or_wait(fut) {
        Some(out) => out,
        None => Err(Error::WouldBlock(what.to_string())),
    }
}

/// `fut`'s output: natively after waiting for it; on wasm32 only if one poll finishes it
/// (`None` otherwise).
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn poll_or_wait<F: Future>(fut: F) -> Option<F::Output> {
    Some(pollster::block_on(fut))
}

/// `fut`'s output: natively after waiting for it; on wasm32 only if one poll finishes it
/// (`None` otherwise).
#[cfg(target_arch = "wasm32")]
pub(crate) fn poll_or_wait<F: Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => Some(out),
        Poll::Pending => None,
    }
}

/// A one-value channel for wgpu's callbacks (used by the wgpu backend's async read-backs).
#[cfg(any(feature = "wgpu", test))]
mod channel {
    use std::future::Future;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll, Waker};

    /// The receiving half of a one-value channel whose sender is a callback (wgpu's `map_async`
    /// and `on_submitted_work_done`): a future that is ready once the callback has run.
    pub(crate) struct Oneshot<T> {
        slot: Arc<Mutex<Slot<T>>>,
    }

    struct Slot<T> {
        value: Option<T>,
        waker: Option<Waker>,
        sent: bool,
    }

    /// The sending half of [`Oneshot`]: call [`Sender::send`] once, from the callback.
    pub(crate) struct Sender<T> {
        slot: Arc<Mutex<Slot<T>>>,
    }

    /// A connected [`Sender`] and [`Oneshot`].
    pub(crate) fn oneshot<T>() -> (Sender<T>, Oneshot<T>) {
        let slot = Arc::new(Mutex::new(Slot {
            value: None,
            waker: None,
            sent: false,
        }));
        (Sender { slot: slot.clone() }, Oneshot { slot })
    }

    impl<T> Sender<T> {
        /// Hands `value` to the receiver and wakes it.
        pub(crate) fn send(self, value: T) {
            let waker = match self.slot.lock() {
                Ok(mut s) => {
                    s.value = Some(value);
                    s.sent = true;
                    s.waker.take()
                }
                Err(_) => None,
            };
            if let Some(w) = waker {
                w.wake();
            }
        }
    }

    impl<T> Drop for Sender<T> {
        fn drop(&mut self) {
            // A sender dropped unsent (the callback never ran) still wakes the receiver, which
            // then reports the loss instead of waiting forever.
            let waker = match self.slot.lock() {
                Ok(mut s) => {
                    s.sent = true;
                    s.waker.take()
                }
                Err(_) => None,
            };
            if let Some(w) = waker {
                w.wake();
            }
        }
    }

    impl<T> Future for Oneshot<T> {
        /// The value, or `None` when the sender was dropped without sending.
        type Output = Option<T>;

        fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            let Ok(mut s) = self.slot.lock() else {
                return Poll::Ready(None);
            };
            if let Some(v) = s.value.take() {
                return Poll::Ready(Some(v));
            }
            if s.sent {
                return Poll::Ready(None);
            }
            s.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

#[cfg(any(feature = "wgpu", test))]
pub(crate) use channel::oneshot;

#[cfg(test)]
mod tests {
    use super::*;
    use channel::oneshot;

    #[test]
    fn block_on_returns_a_ready_output() {
        assert_eq!(block_on("test", async { Ok(3) }).unwrap(), 3);
    }

    #[test]
    fn oneshot_delivers_and_reports_a_lost_sender() {
        let (tx, rx) = oneshot();
        tx.send(5u32);
        assert_eq!(pollster::block_on(rx), Some(5));
        let (tx, rx) = oneshot::<u32>();
        drop(tx);
        assert_eq!(pollster::block_on(rx), None);
    }
}
