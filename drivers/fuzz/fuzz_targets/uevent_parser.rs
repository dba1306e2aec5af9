//! Fuzz target: any bytes through the uevent/replay parser, line by line,
//! must never panic, and every event it accepts must be well formed.
#![no_main]

use drivers::uevent::{Parser, Source};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for only in [None, Some(Source::Kernel), Some(Source::Udev)] {
        let mut parser = Parser::new(only);
        let mut results: Vec<_> = text.lines().filter_map(|line| parser.line(line)).collect();
        results.extend(parser.finish());
        for result in results {
            match result {
                Ok(event) => {
                    assert!(event.sys_path.starts_with("/sys/"), "{event:?}");
                    assert!(!event.sys_name.is_empty(), "{event:?}");
                    assert!(!event.sys_path.split('/').any(|c| c == ".."), "{event:?}");
                }
                Err(e) => assert!(e.line >= 1, "{e}"),
            }
        }
    }
});
