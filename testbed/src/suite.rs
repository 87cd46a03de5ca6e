//! The runner the end-to-end suites share (they use `harness = false`, so the private
//! mount namespace is entered while the process is still single-threaded): gate, set-up,
//! named cases in order (an optional first argument filters them by substring), agent
//! logs on failure, teardown checked to leave no namespace, exit status.

use std::time::Instant;

use anyhow::Result;

use crate::{gate, privns, Testbed};

pub type Case = CaseOn<Testbed>;
/// A named step of a suite whose shared state is `C`.
pub type CaseOn<C> = fn(&mut C) -> Result<()>;

pub fn run(suite: &str, setup: fn() -> Result<Testbed>, cases: &[(&str, Case)]) {
    if !gate::e2e_allowed(suite) {
        return;
    }
    if let Err(e) = privns::enter_private_mounts() {
        panic!("{suite}: cannot set up a private mount namespace: {e:#}");
    }
    let mut tb = match setup() {
        Ok(tb) => tb,
        Err(e) => panic!("{suite}: testbed set-up failed: {e:#}"),
    };
    let mut failed = run_cases(&mut tb, cases, false);
    if failed > 0 {
        println!("{}", tb.logs(40));
    }
    tb.down();
    let left = tb.leftover_namespaces();
    if !left.is_empty() {
        println!("leftover namespaces after down: {left:?}");
        failed += 1;
    }
    println!("\n{suite}: {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}

/// Runs the named cases in order on `ctx` (the command line's first argument filters them
/// by substring), printing each outcome; with `stop_at_failure`, cases after a failure are
/// skipped (for suites whose cases build on each other). Returns how many failed.
pub fn run_cases<C>(ctx: &mut C, cases: &[(&str, CaseOn<C>)], stop_at_failure: bool) -> usize {
    let filter = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let mut failed = 0;
    for (name, case) in cases {
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let started = Instant::now();
        match case(ctx) {
            Ok(()) => println!("test {name} ... ok ({:.1?})", started.elapsed()),
            Err(e) => {
                failed += 1;
                println!(
                    "test {name} ... FAILED ({:.1?})\n  {e:#}",
                    started.elapsed()
                );
                if stop_at_failure {
                    println!("(later cases build on this one: not run)");
                    break;
                }
            }
        }
    }
    failed
}
