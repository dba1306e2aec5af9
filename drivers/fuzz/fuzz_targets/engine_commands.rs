//! Fuzz target: any bytes as a sequence of engine commands (see
//! `script.rs`); no command may panic, and the model's invariants
//! (`check_invariants`, which recounts everything) must hold after each.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod script;

fuzz_target!(|data: &[u8]| script::run(data, false, script::Dialect::Kernel));
