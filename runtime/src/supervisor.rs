//! Long-running tasks under one supervisor: the first one to end (for whatever reason)
//! is reported, so `main` can stop the process cleanly instead of running on without it.

use std::future::Future;

use tokio::task::JoinSet;

#[derive(Default)]
pub struct Supervisor {
    tasks: JoinSet<(&'static str, anyhow::Result<()>)>,
}

impl Supervisor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `task` under the name `name`.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.tasks.spawn(async move { (name, task.await) });
    }

    /// Waits for the first task to end and says which and how. Never returns while
    /// no task runs (so it can sit in a `select!`).
    pub async fn first_ended(&mut self) -> (&'static str, anyhow::Result<()>) {
        match self.tasks.join_next().await {
            Some(Ok(r)) => r,
            Some(Err(e)) => ("(panicked)", Err(anyhow::anyhow!("task failed: {e}"))),
            None => std::future::pending().await,
        }
    }

    /// Stops every task.
    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_task_to_end_is_reported() {
        let mut s = Supervisor::new();
        s.spawn("slow", async {
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            Ok(())
        });
        s.spawn("quick", async { anyhow::bail!("broken") });
        let (name, r) = s.first_ended().await;
        assert_eq!(name, "quick");
        assert!(r.is_err());
        s.shutdown().await;
    }

    #[tokio::test]
    async fn no_task_never_ends() {
        let mut s = Supervisor::new();
        let r = tokio::time::timeout(std::time::Duration::from_millis(20), s.first_ended()).await;
        assert!(r.is_err());
    }
}
