//! Worker supervision: a worker that panics or fails is restarted, with backoff, and reported;
//! one that keeps failing is given up on and reported as down, so that no failure leaves a
//! proxy that looks healthy and serves nothing.
//!
//! [`supervise`] runs one worker's body on its thread. When the body panics or returns an
//! error while the proxy is not stopping, the failure is recorded ([`Control::worker_health`](crate::Control::worker_health)
//! shows restarts and the last reason), the thread waits (100 ms, doubling to 10 s, cut short
//! by shutdown) and runs the body again: a fresh engine that re-reads the table. What the
//! failed run held is released as its stack unwinds (sockets closed, connection permits
//! returned); its clients see their connections reset, as with any proxy restart.
//! [`MAX_RESTARTS`] failures in a row, without a run of [`STABLE_RUN`] between them, give up:
//! the worker is down for good and [`supervise`] returns the last failure.

use std::any::Any;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use tracing::{error, warn};

use crate::backoff::Backoff;
use crate::control::WorkerContext;

/// Failures in a row after which a worker is given up on.
pub const MAX_RESTARTS: u32 = 5;
/// A run this long resets the count of failures in a row.
pub const STABLE_RUN: Duration = Duration::from_secs(60);

/// How one worker is doing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerHealth {
    /// Times the worker was restarted after a failure.
    pub restarts: u64,
    /// Why it last failed.
    pub last_failure: Option<String>,
    /// Given up on: the worker serves nothing until the proxy is restarted.
    pub down: bool,
}

/// Runs `body` (one worker's event loop) on this thread, restarting it after a panic or an
/// error; returns when it ends cleanly, when the proxy stops, or with the last failure once
/// the worker is given up on. Either way the worker is then reported stopped.
pub fn supervise(ctx: &WorkerContext, body: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    let result = restarting(ctx, body);
    ctx.control.report_stopped(ctx.index);
    result
}

fn restarting(ctx: &WorkerContext, mut body: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    let control = &ctx.control;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let mut in_a_row = 0;
    loop {
        let started = Instant::now();
        let failure = match catch_unwind(AssertUnwindSafe(&mut body)) {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(payload) => io::Error::other(format!("panicked: {}", panic_message(&*payload))),
        };
        if control.stopping() {
            return Err(failure);
        }
        if started.elapsed() >= STABLE_RUN {
            in_a_row = 0;
            backoff.succeed();
        }
        in_a_row += 1;
        let reason = failure.to_string();
        if in_a_row > MAX_RESTARTS {
            error!(worker = ctx.index, %reason, "worker failed {MAX_RESTARTS} times in a row; it is down");
            control.report_worker(ctx.index, reason, true);
            return Err(failure);
        }
        let delay = backoff.fail();
        warn!(worker = ctx.index, %reason, ?delay, "worker failed; restarting it");
        control.report_worker(ctx.index, reason, false);
        if control.wait_stopping(delay) {
            return Err(failure);
        }
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::ProxyConfig;
    use crate::control::Control;
    use crate::table::Table;

    fn context() -> WorkerContext {
        WorkerContext {
            index: 0,
            control: Arc::new(Control::new(
                Arc::new(Table::default()),
                ProxyConfig::default(),
                1,
            )),
        }
    }

    #[test]
    #[cfg_attr(miri, ignore)] // waits out the backoff
    fn a_panicking_worker_is_restarted_and_reported() {
        let ctx = context();
        let mut runs = 0;
        let result = supervise(&ctx, || {
            runs += 1;
            if runs == 1 {
                panic!("injected");
            }
            Ok(())
        });
        assert!(result.is_ok());
        assert_eq!(runs, 2);
        let health = &ctx.control.worker_health()[0];
        assert_eq!(health.restarts, 1);
        assert_eq!(health.last_failure.as_deref(), Some("panicked: injected"));
        assert!(!health.down);
    }

    #[test]
    fn a_worker_failing_while_the_proxy_stops_is_not_restarted() {
        let ctx = context();
        ctx.control.begin_shutdown(None);
        let mut runs = 0;
        let result = supervise(&ctx, || {
            runs += 1;
            Err(io::Error::other("gone"))
        });
        assert_eq!(result.unwrap_err().to_string(), "gone");
        assert_eq!(runs, 1);
        assert_eq!(ctx.control.worker_health()[0].restarts, 0);
    }

    #[test]
    #[cfg_attr(miri, ignore)] // waits out the backoff (100 ms to 1.6 s)
    fn a_worker_that_keeps_failing_is_given_up_on() {
        let ctx = context();
        let mut runs = 0;
        let result = supervise(&ctx, || {
            runs += 1;
            Err(io::Error::other(format!("failure {runs}")))
        });
        assert_eq!(result.unwrap_err().to_string(), "failure 6");
        assert_eq!(runs, MAX_RESTARTS + 1);
        let health = &ctx.control.worker_health()[0];
        assert!(health.down);
        assert_eq!(health.restarts, u64::from(MAX_RESTARTS));
        assert_eq!(health.last_failure.as_deref(), Some("failure 6"));
    }
}
