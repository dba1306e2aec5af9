//! Writing to stdout without panicking: a reader that goes away (`devctl
//! monitor | head`) ends devctl quietly instead of aborting it, and colour
//! goes through anstream, which strips it off a terminal or under NO_COLOR.

use std::io::Write;

use crate::failure::{Failure, Outcome};

/// Writes `text` to stdout.
pub fn write_str(text: &str) -> Outcome {
    let mut out = anstream::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                Failure::OutputClosed
            } else {
                Failure::Failed(format!("cannot write to stdout: {e}"))
            }
        })
}

/// Writes `text` and a newline to stdout.
pub fn write_line(text: &str) -> Outcome {
    write_str(&format!("{text}\n"))
}
