//! The one shutdown mechanism: a [`CancellationToken`] tree rooted here.
//!
//! The first SIGTERM or SIGINT cancels the root token; every task holds a child and stops at
//! its next await point. A second signal exits the process at once.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Cancels the returned token on the first SIGTERM/SIGINT; exits with 130 on the second.
pub fn install() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let root = token.clone();
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("shutdown requested; a second signal exits at once");
        root.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("second signal, exiting now");
        std::process::exit(130);
    });
    Ok(token)
}
