//! The tests' one bounded wait: ask a condition every 20 ms until it holds or a timeout passes.
//!
//! [`eventually`] is for conditions that await (an etcd client, a cache in-process);
//! [`eventually_blocking`] for those that block (HTTP to a host process, a file, a log), from
//! plain threads or from async tests alike. Both run the same loop, so the bound and the
//! interval mean the same everywhere. They return whether the condition held: the caller's
//! assertion names what was awaited and shows the state that explains a failure.

use std::future::{Future, ready};
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Between two asks: short enough that a test notices a change at once, long enough that
/// asking (often an HTTP request or an etcd read) does not load the machine.
const INTERVAL: Duration = Duration::from_millis(20);

/// Awaits `condition` every 20 ms until it holds (`true`) or `timeout` passes (`false`).
/// The last ask comes after the timeout, so a condition met just in time counts.
pub async fn eventually<F, Fut>(timeout: Duration, condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    until_deadline(timeout, condition, tokio::time::sleep).await
}

/// [`eventually`] for a condition that blocks, sleeping the thread in between. In an async
/// test it blocks that worker thread, like any blocking call the condition makes.
pub fn eventually_blocking(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let wait = until_deadline(
        timeout,
        || ready(condition()),
        |pause| {
            std::thread::sleep(pause);
            ready(())
        },
    );
    // Every future in the loop is ready at once, so one poll runs it to the end and no
    // runtime is needed (nor allowed: async tests call this too).
    match pin!(wait).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(held) => held,
        Poll::Pending => unreachable!("a blocking wait never pends"),
    }
}

/// The loop both entries share; `sleep` pauses between asks.
async fn until_deadline<F, Fut, S, P>(timeout: Duration, mut condition: F, sleep: S) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
    S: Fn(Duration) -> P,
    P: Future<Output = ()>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        sleep(INTERVAL).await;
    }
}
