//! Watch streams that never end on an error. kube-runtime's watcher yields an `Err`
//! whenever a watch cannot be (re)started (API server restart, 410 Gone, network
//! blip) and recovers on a later poll; with back-off it retries by itself. Ending the
//! task on the first `Err` turned every API server restart into exiting processes.
//! These helpers log each error, count it, and keep going with what is known.

use std::fmt::Display;

use futures::{Stream, StreamExt};
use tracing::warn;

/// The events of `stream` with its errors logged and passed to `count` (a metric),
/// never ending on one. Apply it to a stream that already backs off
/// (`.default_backoff()`).
pub fn resilient<S, T, E>(
    stream: S,
    what: &'static str,
    count: impl Fn() + Send + 'static,
) -> impl Stream<Item = T> + Send
where
    S: Stream<Item = Result<T, E>> + Send,
    T: Send,
    E: Display + Send,
{
    stream.filter_map(move |r| {
        let out = match r {
            Ok(v) => Some(v),
            Err(e) => {
                warn!(watch = what, "watch error (retrying with back-off): {e}");
                count();
                None
            }
        };
        std::future::ready(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test]
    async fn errors_are_counted_and_the_stream_goes_on() {
        let n = Arc::new(AtomicU64::new(0));
        let n2 = n.clone();
        let s = futures::stream::iter(vec![Ok(1), Err("gone"), Err("refused"), Ok(2)]);
        let got: Vec<i32> = resilient(s, "test", move || {
            n2.fetch_add(1, Ordering::Relaxed);
        })
        .collect()
        .await;
        assert_eq!(got, vec![1, 2]);
        assert_eq!(n.load(Ordering::Relaxed), 2);
    }
}
