//! A linear check of a YAML text's flow nesting, run before the text is parsed.
//!
//! libyaml (under serde_norway) scans flow collections (`[...]`, `{...}`) in time that grows
//! with the number of tokens times the nesting depth, so a file of 100,000 `[` takes seconds
//! to reject and a megabyte of them minutes. Kubernetes objects nest a dozen levels, so
//! [`check`] rejects any text whose flow collections nest deeper than [`MAX_FLOW_DEPTH`],
//! in one pass and without parsing. Block nesting (indentation) costs libyaml nothing extra
//! and is left to serde_norway's own recursion limit.
//!
//! The scan follows YAML's lexical rules closely enough to count only real flow indicators:
//! it skips comments, quoted scalars (a quote opens one only where a node can start) and
//! block scalars (`|`, `>`: the lines indented deeper than their parent). Where it cannot
//! tell, it counts: a bracket inside a plain scalar of the block context (`cmd: a[0]`) may
//! count toward the depth, so a text can be rejected that libyaml would accept, never the
//! other way round.

/// Deepest flow nesting accepted.
pub const MAX_FLOW_DEPTH: usize = 64;

/// Where the scan is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Outside quotes and comments.
    Plain,
    /// In a `'...'` scalar.
    Single,
    /// In a `"..."` scalar.
    Double,
    /// After `#`, up to the end of the line.
    Comment,
}

/// Checks that no flow collection in `text` nests deeper than [`MAX_FLOW_DEPTH`]; the error
/// names the line.
pub fn check(text: &str) -> Result<(), String> {
    scan(text, MAX_FLOW_DEPTH).map(drop).map_err(|line| {
        format!(
            "line {line}: flow collections ([...], {{...}}) nest deeper than {MAX_FLOW_DEPTH} levels"
        )
    })
}

/// The deepest flow nesting the scan counts in `text`, or the line where it first passes
/// `limit`.
pub fn scan(text: &str, limit: usize) -> Result<usize, usize> {
    let bytes = text.as_bytes();
    let mut state = State::Plain;
    let mut depth = 0usize;
    let mut deepest = 0usize;
    let mut line = 1usize;
    // The last character outside blanks and whether a blank followed it; `None` at the start
    // of a line in the block context.
    let mut prev: Option<u8> = None;
    let mut blank_after_prev = true;
    // Indentation of the current line, and of the line a block scalar hangs from.
    let mut indent = 0usize;
    let mut at_line_start = true;
    let mut block_scalar_parent: Option<usize> = None;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'\n' {
            line += 1;
            at_line_start = true;
            indent = 0;
            if state == State::Comment {
                state = State::Plain;
            }
            // Quoted scalars may span lines only inside flow collections here: in the block
            // context a line ends them (which only ever makes the scan count more).
            if depth == 0 && state != State::Plain {
                state = State::Plain;
            }
            if depth == 0 {
                prev = None;
            }
            blank_after_prev = true;
            i += 1;
            continue;
        }
        if at_line_start {
            if c == b' ' {
                indent += 1;
                i += 1;
                continue;
            }
            at_line_start = false;
            if let Some(parent) = block_scalar_parent {
                let blank_line = c == b'\r' && bytes.get(i + 1) == Some(&b'\n');
                if indent > parent || blank_line {
                    // Block scalar content: skip the line.
                    while i < bytes.len() && bytes[i] != b'\n' {
                        i += 1;
                    }
                    continue;
                }
                block_scalar_parent = None;
            }
        }
        match state {
            State::Comment => {}
            State::Single => {
                if c == b'\'' {
                    if bytes.get(i + 1) == Some(&b'\'') {
                        i += 1;
                    } else {
                        state = State::Plain;
                        prev = Some(c);
                        blank_after_prev = false;
                    }
                }
            }
            State::Double => match c {
                b'\\' => i += 1,
                b'"' => {
                    state = State::Plain;
                    prev = Some(c);
                    blank_after_prev = false;
                }
                _ => {}
            },
            State::Plain => match c {
                b' ' | b'\t' | b'\r' => blank_after_prev = true,
                b'#' if blank_after_prev => state = State::Comment,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > limit {
                        return Err(line);
                    }
                    deepest = deepest.max(depth);
                    prev = Some(c);
                    blank_after_prev = false;
                }
                b']' | b'}' => {
                    depth = depth.saturating_sub(1);
                    prev = Some(c);
                    blank_after_prev = false;
                }
                b'\'' | b'"' if node_starts(prev, blank_after_prev, depth) => {
                    state = if c == b'\'' {
                        State::Single
                    } else {
                        State::Double
                    };
                }
                b'|' | b'>'
                    if depth == 0
                        && node_starts(prev, blank_after_prev, depth)
                        && ends_block_header(&bytes[i + 1..]) =>
                {
                    block_scalar_parent = Some(parent_indent(bytes, i, indent));
                    while i < bytes.len() && bytes[i] != b'\n' {
                        i += 1;
                    }
                    continue;
                }
                _ => {
                    prev = Some(c);
                    blank_after_prev = false;
                }
            },
        }
        i += 1;
    }
    Ok(deepest)
}

/// Whether a node (a quoted scalar, a block scalar) may start here, after `prev`.
fn node_starts(prev: Option<u8>, blank_after_prev: bool, depth: usize) -> bool {
    match prev {
        None => depth == 0,
        Some(b'[' | b'{' | b',') => true,
        // An indicator needs a blank after it, except `:` after a JSON-like key.
        Some(b'-' | b'?' | b':') => blank_after_prev,
        _ => false,
    }
}

/// Whether what follows a `|` or `>` is a block scalar header: indentation and chomping
/// indicators, then blanks and perhaps a comment, then the end of the line.
fn ends_block_header(rest: &[u8]) -> bool {
    let header = rest
        .iter()
        .take_while(|c| matches!(c, b'-' | b'+' | b'0'..=b'9'))
        .count();
    let rest = &rest[header..];
    let blanks = rest
        .iter()
        .take_while(|c| matches!(c, b' ' | b'\t' | b'\r'))
        .count();
    match rest.get(blanks) {
        None | Some(b'\n') => true,
        Some(b'#') => blanks > 0,
        _ => false,
    }
}

/// The indentation of the node a block scalar at `at` belongs to: the column of the key on
/// its line, or of the `-` of a sequence entry that is the scalar itself (`- |`).
fn parent_indent(bytes: &[u8], at: usize, indent: usize) -> usize {
    let line_start = bytes[..at]
        .iter()
        .rposition(|&c| c == b'\n')
        .map_or(0, |p| p + 1);
    let mut col = indent;
    let mut pos = line_start + indent;
    // Skip "- " entries; a scalar right after one belongs to that entry.
    while pos < at && bytes[pos] == b'-' && matches!(bytes.get(pos + 1), Some(b' ')) {
        let dash = col;
        pos += 1;
        col += 1;
        while pos < at && bytes[pos] == b' ' {
            pos += 1;
            col += 1;
        }
        if pos == at {
            return dash;
        }
    }
    col
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) {
        assert_eq!(check(text), Ok(()), "{text:?}");
    }

    fn deep(text: &str) {
        assert!(check(text).is_err(), "accepted {text:?}");
    }

    #[test]
    fn real_nesting_past_the_limit_is_rejected_and_the_line_named() {
        let n = MAX_FLOW_DEPTH + 1;
        deep(&format!("a: {}{}", "[".repeat(n), "]".repeat(n)));
        deep(&"{".repeat(n));
        let e = check(&format!("a: 1\nb: {}", "[".repeat(n))).unwrap_err();
        assert!(e.starts_with("line 2: "), "{e}");
        ok(&format!(
            "a: {}{}",
            "[".repeat(MAX_FLOW_DEPTH),
            "]".repeat(MAX_FLOW_DEPTH)
        ));
    }

    #[test]
    fn brackets_in_quotes_comments_and_block_scalars_do_not_count() {
        let many = "[".repeat(MAX_FLOW_DEPTH + 1);
        ok(&format!("a: '{many}'\nb: \"{many}\"\n"));
        ok(&format!("a: 1 # {many}\n# {many}\n"));
        ok(&format!(
            "data:\n  script: |\n    {many}\n    more\n  next: 1\n"
        ));
        ok(&format!("- >-\n  {many}\n- x\n"));
        ok(&format!("x: ['it''s', \"a\\\"b\", '{many}']\n"));
    }

    #[test]
    fn closers_in_quotes_cannot_hide_real_nesting() {
        let n = MAX_FLOW_DEPTH + 1;
        // Each level holds a quoted "]" that is not a closer.
        deep(&format!("a: {}", "[ \"]\", ".repeat(n)));
        deep(&format!("a: {}", "[ ']', ".repeat(n)));
        // An apostrophe inside a plain scalar opens no quote.
        deep(&format!("a: [don't, {}", "[".repeat(n)));
        deep(&format!("[foo\n'bar, {}", "[".repeat(n)));
        deep(&format!("- a 'b: {}", "[".repeat(n)));
    }

    #[test]
    fn lines_after_a_block_scalar_are_scanned_again() {
        let many = "[".repeat(MAX_FLOW_DEPTH + 1);
        // `other` is a sibling of `key`, not the scalar's content.
        deep(&format!("- key: |\n  other: {many}\n"));
        deep(&format!("key: |\nreal: {many}\n"));
        deep(&format!("a:\n  b: >\n    text\n  c: {many}\n"));
    }

    #[test]
    fn the_scan_is_linear() {
        // A megabyte of openers is rejected at the 65th.
        deep(&"[".repeat(1 << 20));
        // A megabyte of balanced shallow collections passes.
        ok(&"[a, {b: c}], ".repeat(1 << 16));
    }
}
