//! One result type for every path, and the one place it becomes a hook's
//! action: each path returns a [`Path`], [`finish`] counts the packet and
//! asks the hook ([`Ctx`]) for its return value.
//!
//! A path's error is a [`Done`] too (`Leave::Reason`, from the [`Counter`]
//! naming it): a `Result<Done, Counter>` leaves the `Done` fields undefined
//! on its error side, and where the two sides meet the compiler may spill
//! those undefined registers, which the verifier refuses.

use aya_log_ebpf::warn;
use proxy_common::{Counter, Verdict};

use crate::{ctx::Ctx, fib::Route, stats};

/// Where a handled packet goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Leave {
    /// Not a service's packet: untouched, uncounted.
    NotOurs,
    /// Goes on (up the stack or to the next program), translated or left
    /// for a later hook.
    Pass,
    /// Translated and prepared for the route (`Via::Out` or
    /// `Via::NoNeigh`): the hook sends it there.
    Send,
    /// Turned around: sent back out of the interface it came in on (a
    /// reject, a hairpin).
    Bounce,
    /// Stopped for the reason `Done::counter` names: passed on untouched
    /// or dropped, as its verdict says.
    Reason,
}

/// What every path returns: `Err` carries the reason (`Leave::Reason`).
pub type Path = Result<Done, Done>;

/// How a handled packet leaves the program, and the counter that names its
/// path. A plain struct with every field always set, not an enum with
/// payloads: payload bits a variant leaves undefined may be compiled into
/// reads of uninitialised registers, which the verifier refuses.
#[derive(Clone, Copy)]
pub struct Done {
    pub leave: Leave,
    pub counter: Counter,
    /// Where `Leave::Send` sends it.
    pub route: Route,
}

impl Done {
    /// Not a service's packet.
    pub const NOT_OURS: Done = Done {
        leave: Leave::NotOurs,
        // Never counted.
        counter: Counter::NewFlow,
        route: Route::NONE,
    };

    /// Goes on, counted as `counter`.
    #[inline(always)]
    pub const fn pass(counter: Counter) -> Done {
        Done {
            leave: Leave::Pass,
            counter,
            route: Route::NONE,
        }
    }

    /// Sent by `route`, counted as `counter`.
    #[inline(always)]
    pub const fn send(counter: Counter, route: Route) -> Done {
        Done {
            leave: Leave::Send,
            counter,
            route,
        }
    }

    /// Stopped for `reason`.
    #[inline(always)]
    pub const fn reason(reason: Counter) -> Done {
        Done {
            leave: Leave::Reason,
            counter: reason,
            route: Route::NONE,
        }
    }

    /// Sent back where it came from, counted as `counter`.
    #[inline(always)]
    pub const fn bounce(counter: Counter) -> Done {
        Done {
            leave: Leave::Bounce,
            counter,
            route: Route::NONE,
        }
    }
}

impl From<Counter> for Done {
    #[inline(always)]
    fn from(reason: Counter) -> Done {
        Done::reason(reason)
    }
}

/// The hook's action for a path's result. A drop is counted by reason; one
/// that means something failed is also logged.
#[inline(always)]
pub fn finish<C: Ctx>(ctx: &C, path: Path) -> C::Action {
    let (Ok(done) | Err(done)) = path;
    match done.leave {
        Leave::NotOurs => C::NEXT,
        Leave::Pass => {
            stats::count(done.counter);
            C::NEXT
        }
        Leave::Send => {
            stats::count(done.counter);
            ctx.send(done.route)
        }
        Leave::Bounce => {
            stats::count(done.counter);
            ctx.bounce()
        }
        Leave::Reason => {
            let reason = done.counter;
            stats::count(reason);
            match reason.verdict() {
                Verdict::Failed => {
                    // Internal failures, never routine: worth a log line.
                    warn!(ctx, "packet dropped, reason {}", reason as u32);
                    C::DROP
                }
                Verdict::Dropped => C::DROP,
                Verdict::Passed | Verdict::Handled => C::NEXT,
            }
        }
    }
}
