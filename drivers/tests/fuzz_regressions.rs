//! Every input the engine fuzz target ever failed on (drivers/fuzz/
//! regressions), replayed through the same interpreter on stable Rust, so
//! a fixed bug stays fixed without a fuzzer.

#[path = "../fuzz/fuzz_targets/script.rs"]
mod script;

#[test]
fn every_fuzz_regression_passes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut ran = 0;
    for entry in std::fs::read_dir(&dir).expect("regressions") {
        let path = entry.expect("entry").path();
        if !path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("engine_commands"))
        {
            continue;
        }
        let data = std::fs::read(&path).expect("input");
        let trace = std::env::var_os("FUZZ_TRACE").is_some();
        // Inputs saved before the kernel's users existed keep their meaning.
        let dialect = if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("engine_commands-v2-"))
        {
            script::Dialect::Kernel
        } else {
            script::Dialect::Classic
        };
        let result = std::panic::catch_unwind(|| script::run(&data, trace, dialect));
        assert!(result.is_ok(), "{} fails again", path.display());
        ran += 1;
    }
    assert!(ran >= 1, "no regression inputs found in {}", dir.display());
}
