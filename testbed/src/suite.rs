//! The runner the end-to-end suites share (they use `harness = false`, so the private
//! mount namespace is entered while the process is still single-threaded): gate, set-up,
//! named cases in order (an optional first argument filters them by substring), agent
//! logs on failure, teardown checked to leave no namespace, exit status.

use std::time::Instant;

use anyhow::Result;

use crate::{gate, privns, Testbed};

pub type Case = fn(&mut Testbed) -> Result<()>;

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
    let filter = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let mut failed = 0;
    for (name, case) in cases {
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let started = Instant::now();
        match case(&mut tb) {
            Ok(()) => println!("test {name} ... ok ({:.1?})", started.elapsed()),
            Err(e) => {
                failed += 1;
                println!(
                    "test {name} ... FAILED ({:.1?})\n  {e:#}",
                    started.elapsed()
                );
            }
        }
    }
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
