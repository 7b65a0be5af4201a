//! Waiting for a condition with a deadline, the one way every test here does it: poll, sleep,
//! and fail the test naming what it waited for when the deadline passes.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `f` every `every` until it returns `Some`, for at most `limit` (blocking the thread).
pub fn until<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t0.elapsed() < limit,
            "timed out after {:.1} s waiting for {what}",
            limit.as_secs_f64()
        );
        std::thread::sleep(every);
    }
}

/// [`until`] for an async condition, sleeping on the tokio timer.
pub async fn until_async<T, Fut: Future<Output = Option<T>>>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut f: impl FnMut() -> Fut,
) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            t0.elapsed() < limit,
            "timed out after {:.1} s waiting for {what}",
            limit.as_secs_f64()
        );
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_once_it_comes_and_names_what_timed_out() {
        let mut n = 0;
        let v = until(
            "three polls",
            Duration::from_secs(5),
            Duration::ZERO,
            || {
                n += 1;
                (n == 3).then_some(n)
            },
        );
        assert_eq!(v, 3);
        let e = std::panic::catch_unwind(|| {
            until::<()>(
                "nothing",
                Duration::from_millis(10),
                Duration::from_millis(1),
                || None,
            )
        })
        .unwrap_err();
        let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("waiting for nothing"), "{msg}");
    }

    #[tokio::test]
    async fn the_async_form_polls_too() {
        let mut n = 0;
        let v = until_async("two polls", Duration::from_secs(5), Duration::ZERO, || {
            n += 1;
            std::future::ready((n == 2).then_some("ok"))
        })
        .await;
        assert_eq!(v, "ok");
    }
}
