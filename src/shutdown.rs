//! Shutdown signalling: one sender owned by the app, cheap receivers everywhere that serves.
//!
//! Owns: the rule that every long-lived task (stream, server, reaper) ends when asked, so
//! that a drain finishes within its deadline.

use tokio::sync::watch;

/// Triggers shutdown.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Resolves when shutdown has been triggered. Clone it into every task.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A linked trigger and listener.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    /// Asks every listener to stop.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Waits until shutdown is triggered (or the trigger is dropped).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|v| *v).await;
    }

    /// True once shutdown was triggered.
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
}
