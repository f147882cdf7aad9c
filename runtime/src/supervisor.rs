//! Long-running tasks under one supervisor: the first one to end (for whatever reason)
//! is reported, so `main` can stop the process cleanly instead of running on without it.

use std::collections::HashMap;
use std::future::Future;

use tokio::task::{Id, JoinSet};

#[derive(Default)]
pub struct Supervisor {
    tasks: JoinSet<(&'static str, anyhow::Result<()>)>,
    /// The name of each task, so that one that panicked is reported by name.
    names: HashMap<Id, &'static str>,
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
        let handle = self.tasks.spawn(async move { (name, task.await) });
        self.names.insert(handle.id(), name);
    }

    /// Waits for the first task to end and says which and how. Never returns while
    /// no task runs (so it can sit in a `select!`).
    pub async fn first_ended(&mut self) -> (&'static str, anyhow::Result<()>) {
        match self.tasks.join_next_with_id().await {
            Some(Ok((id, r))) => {
                self.names.remove(&id);
                r
            }
            Some(Err(e)) => {
                let name = self.names.remove(&e.id()).unwrap_or("(unnamed)");
                (name, Err(anyhow::anyhow!("task {name} failed: {e}")))
            }
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
    async fn a_task_that_panics_is_reported_by_its_name() {
        let mut s = Supervisor::new();
        s.spawn("slow", async {
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            Ok(())
        });
        s.spawn("stats streams", async { panic!("broken") });
        let (name, r) = s.first_ended().await;
        assert_eq!(name, "stats streams");
        assert!(format!("{:?}", r.unwrap_err()).contains("stats streams"));
        s.shutdown().await;
    }

    #[tokio::test]
    async fn no_task_never_ends() {
        let mut s = Supervisor::new();
        let r = tokio::time::timeout(std::time::Duration::from_millis(20), s.first_ended()).await;
        assert!(r.is_err());
    }
}
