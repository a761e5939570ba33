//! SIGINT/SIGTERM handling.
//!
//! The handler only records the signal. Long-running work (child processes, copy
//! loops) polls [`interrupted`] and returns an error, so the stack unwinds normally
//! and every guard's `Drop` runs: that is how a Ctrl-C leaves no mount behind.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Once;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static INSTALL: Once = Once::new();

/// Installs the handlers once per process. Safe to call many times.
pub fn install() {
    INSTALL.call_once(|| {
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            // SAFETY: the handler only stores to atomics, which is async-signal-safe.
            let res = unsafe {
                signal_hook::low_level::register(sig, move || {
                    SIGNAL.store(sig, Ordering::SeqCst);
                    INTERRUPTED.store(true, Ordering::SeqCst);
                })
            };
            if let Err(e) = res {
                tracing::warn!("cannot install handler for signal {sig}: {e}");
            }
        }
    });
}

/// True once SIGINT or SIGTERM arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The signal number that interrupted us, if any.
pub fn signal() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Returns `Err(Interrupted)` when a signal arrived; call between steps.
pub fn check() -> Result<(), Interrupted> {
    if interrupted() {
        Err(Interrupted(signal().unwrap_or(signal_hook::consts::SIGINT)))
    } else {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("interrupted by signal {0}")]
pub struct Interrupted(pub i32);
