//! One shutdown policy for both daemons' gRPC servers: on a stop, the daemon reports
//! NOT_SERVING, its servers stop accepting, in-flight calls get [`DRAIN_LIMIT`] to finish,
//! and whatever is still open then (an idle client that never hangs up) is closed.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

/// How long a graceful stop waits for in-flight calls and open connections.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// The drain of a stopping daemon, shared by its servers.
#[derive(Clone, Debug)]
pub struct Drain {
    tx: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// A drain not started.
    pub fn new() -> Self {
        Self {
            tx: watch::channel(false).0,
        }
    }

    /// Starts the drain: every server built with [`Drain::signal`] stops accepting.
    pub fn start(&self) {
        self.tx.send_replace(true);
    }

    /// Resolves once the drain has started: the shutdown future of
    /// `serve_with_incoming_shutdown`.
    pub fn signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            let _ = rx.wait_for(|d| *d).await;
        }
    }

    /// Runs `serving` to its end, but for no longer than [`DRAIN_LIMIT`] once the drain
    /// has started; `None` when the limit cut it short.
    pub async fn bounded<T>(&self, serving: impl Future<Output = T>) -> Option<T> {
        let started = self.signal();
        tokio::select! {
            r = serving => Some(r),
            _ = async { started.await; tokio::time::sleep(DRAIN_LIMIT).await } => {
                tracing::warn!(limit = ?DRAIN_LIMIT, "drain limit reached; closing remaining connections");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_drain_waits_for_in_flight_work_but_no_longer_than_its_limit() {
        let d = Drain::new();
        // Work that ends by itself before any drain.
        assert_eq!(d.bounded(async { 7 }).await, Some(7));
        // Work that ends within the limit after the drain started.
        let d2 = d.clone();
        let quick = tokio::spawn(async move {
            d2.bounded(async {
                tokio::time::sleep(DRAIN_LIMIT * 10).await;
            })
            .await
        });
        let signalled = d.signal();
        d.start();
        signalled.await;
        // Work that never ends is cut at the limit.
        assert_eq!(quick.await.unwrap(), None);
        assert!(d.bounded(std::future::pending::<()>()).await.is_none());
    }
}
