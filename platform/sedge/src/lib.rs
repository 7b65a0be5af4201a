//! The `sedge` command as a library: each subcommand's flags and the function that runs it,
//! so that tests can start any role in process; `main.rs` only parses the command line.

pub mod apiserver;
pub mod platform;
pub mod tools;
pub mod tunnel;
pub mod worker;

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
