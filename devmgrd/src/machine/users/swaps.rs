//! `/proc/swaps` read into the paths swap is on (proc(5)). Pure: a
//! malformed line is skipped, never a panic.

use super::mountinfo::unescape;

/// The swap areas' paths (a device node or a file), in the file's order.
pub fn parse(text: &str) -> Vec<String> {
    text.lines()
        // The header: "Filename Type Size Used Priority".
        .skip_while(|line| line.starts_with("Filename"))
        .filter_map(|line| {
            // The path is escaped like mountinfo's (a space is \040), so it
            // is the first whitespace-separated field; a swap file that was
            // deleted while on is shown with " (deleted)" after it.
            let path = line.split_whitespace().next()?;
            Some(unescape(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn paths_come_from_the_first_field_after_the_header() {
        let text = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
                    /dev/loop5                              partition\t1020\t\t0\t\t-2\n\
                    /swap\\040file                             file\t\t1024\t\t0\t\t-3\n";
        assert_eq!(parse(text), ["/dev/loop5", "/swap file"]);
        assert!(parse("Filename Type Size Used Priority\n").is_empty());
        assert!(parse("").is_empty());
        assert_eq!(parse("   \n/dev/x"), ["/dev/x"]);
    }
}
