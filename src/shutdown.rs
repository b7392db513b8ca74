//! The shutdown signal shared by background tasks: a `watch` channel that
//! turns true once. Tasks select on [`requested`] next to their work.

use tokio::sync::watch;

/// Resolves once shutdown was requested (or the sender is gone).
pub async fn requested(rx: &mut watch::Receiver<bool>) {
    // The returned guard is dropped here, so callers' futures stay Send.
    let _ = rx.wait_for(|stop| *stop).await;
}
