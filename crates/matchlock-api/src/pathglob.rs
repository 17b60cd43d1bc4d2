//! Go `path.Match` semantics for rule path globs: network hook rules (spec §7.7.1, §15 item 49)
//! and VFS interception rules (§9.4) match paths the same way.
//!
//! # Design
//! The reference matches rule paths with Go's `path.Match`: `*` is any run of non-`/`
//! characters, `?` one non-`/` character, `[...]` / `[^...]` a class of characters or
//! `lo-hi` ranges (a class *may* match `/`), `\c` the literal `c`. A malformed pattern never
//! matches, whatever the path (Go reports `ErrBadPattern`; the reference treats that as no
//! match). The pattern is validated once, in full, before matching, and matching follows
//! Go's chunk algorithm (a literal run after a `*` is tried at each position the `*` can
//! reach, leftmost first), so the same pattern selects the same paths as the reference.
//!
//! # Limitations
//! Paths are compared as Rust strings: a request path that is not UTF-8 after percent
//! decoding was decoded lossily before it got here.

/// Whether `name` matches the Go `path.Match` pattern `pattern`; a malformed pattern matches
/// nothing.
pub fn path_match(pattern: &str, name: &str) -> bool {
    if !pattern_is_valid(pattern) {
        return false;
    }
    let mut pattern = pattern;
    let mut name = name;
    while !pattern.is_empty() {
        let (star, chunk, rest) = scan_chunk(pattern);
        pattern = rest;
        if star && chunk.is_empty() {
            return !name.contains('/');
        }
        if let Some(t) = match_chunk(chunk, name) {
            if t.is_empty() || !pattern.is_empty() {
                name = t;
                continue;
            }
        }
        if !star {
            return false;
        }
        match skip_and_match(chunk, name, pattern.is_empty()) {
            Some(t) => name = t,
            None => return false,
        }
    }
    name.is_empty()
}

/// After a `*`: try `chunk` after skipping 1, 2, ... characters (never a `/`).
fn skip_and_match<'a>(chunk: &str, name: &'a str, last: bool) -> Option<&'a str> {
    for (i, c) in name.char_indices() {
        if c == '/' {
            return None;
        }
        if let Some(t) = match_chunk(chunk, &name[i + c.len_utf8()..]) {
            if last && !t.is_empty() {
                continue;
            }
            return Some(t);
        }
    }
    None
}

/// Splits off a leading run of `*`s (reported as `star`) and the chunk up to the next
/// unescaped `*` outside a class.
fn scan_chunk(pattern: &str) -> (bool, &str, &str) {
    let trimmed = pattern.trim_start_matches('*');
    let star = trimmed.len() != pattern.len();
    let bytes = trimmed.as_bytes();
    let mut in_class = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 1,
            b'[' => in_class = true,
            b']' => in_class = false,
            b'*' if !in_class => break,
            _ => {}
        }
        i += 1;
    }
    let i = i.min(bytes.len());
    (star, &trimmed[..i], &trimmed[i..])
}

/// Matches `chunk` (no `*`) at the start of `s`; the rest of `s` on success. Assumes a
/// validated pattern.
fn match_chunk<'a>(chunk: &str, s: &'a str) -> Option<&'a str> {
    let mut chunk = chunk;
    let mut s = s;
    while let Some(pc) = chunk.chars().next() {
        let sc = s.chars().next()?;
        match pc {
            '[' => {
                let (matched, rest) = match_class(&chunk[1..], sc)?;
                if !matched {
                    return None;
                }
                chunk = rest;
            }
            '?' => {
                if sc == '/' {
                    return None;
                }
                chunk = &chunk[1..];
            }
            _ => {
                let (lit, rest) = literal(chunk)?;
                if lit != sc {
                    return None;
                }
                chunk = rest;
            }
        }
        s = &s[sc.len_utf8()..];
    }
    Some(s)
}

/// One (possibly `\`-escaped) literal character at the start of `chunk`.
fn literal(chunk: &str) -> Option<(char, &str)> {
    let chunk = chunk.strip_prefix('\\').unwrap_or(chunk);
    let c = chunk.chars().next()?;
    Some((c, &chunk[c.len_utf8()..]))
}

/// A class body after `[`: whether `c` is in it, and the pattern after the closing `]`.
/// `None` when the class is malformed.
fn match_class(body: &str, c: char) -> Option<(bool, &str)> {
    let (negated, mut body) = match body.strip_prefix('^') {
        Some(rest) => (true, rest),
        None => (false, body),
    };
    let mut matched = false;
    let mut ranges = 0;
    loop {
        if ranges > 0 {
            if let Some(rest) = body.strip_prefix(']') {
                return Some((matched != negated, rest));
            }
        }
        let (lo, rest) = class_char(body)?;
        body = rest;
        let mut hi = lo;
        if let Some(rest) = body.strip_prefix('-') {
            let (h, rest) = class_char(rest)?;
            hi = h;
            body = rest;
        }
        if lo <= c && c <= hi {
            matched = true;
        }
        ranges += 1;
    }
}

/// One class character: not an unescaped `-` or `]`, and something must follow it.
fn class_char(s: &str) -> Option<(char, &str)> {
    if s.is_empty() || s.starts_with('-') || s.starts_with(']') {
        return None;
    }
    let (c, rest) = literal(s)?;
    if rest.is_empty() {
        return None;
    }
    Some((c, rest))
}

/// Whether the whole pattern is well formed (every class closed and non-empty, every
/// range complete, no trailing `\`).
fn pattern_is_valid(pattern: &str) -> bool {
    let mut rest = pattern;
    while !rest.is_empty() {
        let (_, chunk, after) = scan_chunk(rest);
        rest = after;
        if !chunk_is_valid(chunk) {
            return false;
        }
    }
    true
}

fn chunk_is_valid(chunk: &str) -> bool {
    let mut chunk = chunk;
    while let Some(pc) = chunk.chars().next() {
        chunk = match pc {
            '[' => match match_class(&chunk[1..], '\0') {
                Some((_, rest)) => rest,
                None => return false,
            },
            '\\' => match literal(chunk) {
                Some((_, rest)) => rest,
                None => return false,
            },
            _ => &chunk[pc.len_utf8()..],
        };
    }
    true
}

#[cfg(test)]
mod tests {
    use super::path_match;

    #[test]
    fn go_path_match_table() {
        // (pattern, name, matches) — the cases of Go's path.Match documentation and tests.
        let table: &[(&str, &str, bool)] = &[
            ("abc", "abc", true),
            ("*", "abc", true),
            ("*c", "abc", true),
            ("a*", "a", true),
            ("a*", "abc", true),
            ("a*", "ab/c", false),
            ("a*/b", "abc/b", true),
            ("a*/b", "a/c/b", false),
            ("a*b*c*d*e*/f", "axbxcxdxe/f", true),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/f", true),
            ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", false),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", false),
            ("a*b?c*x", "abxbbxdbxebxczzx", true),
            ("a*b?c*x", "abxbbxdbxebxczzy", false),
            ("ab[c]", "abc", true),
            ("ab[b-d]", "abc", true),
            ("ab[e-g]", "abc", false),
            ("ab[^c]", "abc", false),
            ("ab[^b-d]", "abc", false),
            ("ab[^e-g]", "abc", true),
            ("a\\*b", "a*b", true),
            ("a\\*b", "ab", false),
            ("a?b", "a☺b", true),
            ("a[^a]b", "a☺b", true),
            ("a???b", "a☺b", false),
            ("a[^a][^a][^a]b", "a☺b", false),
            ("[a-ζ]*", "α", true),
            ("*[a-ζ]", "A", false),
            ("a?b", "a/b", false),
            ("a*b", "a/b", false),
            ("[\\]a]", "]", true),
            ("[\\-]", "-", true),
            ("[x\\-]", "x", true),
            ("[x\\-]", "-", true),
            ("[x\\-]", "z", false),
            ("[\\-x]", "x", true),
            ("[\\-x]", "-", true),
            ("[\\-x]", "a", false),
            ("*x", "xxx", true),
            ("/api/*", "/api/v1", true),
            ("/api/*", "/api/v1/x", false),
            ("/anything/v1", "/anything/v1", true),
            ("/sse", "/sse", true),
            // A class may match '/', unlike '?' and '*'.
            ("a[^x]b", "a/b", true),
        ];
        for (pattern, name, want) in table {
            assert_eq!(path_match(pattern, name), *want, "{pattern:?} vs {name:?}");
        }
    }

    #[test]
    fn malformed_patterns_never_match() {
        let table: &[(&str, &str)] = &[
            ("[]a]", "]"),
            ("[-]", "-"),
            ("[x-]", "x"),
            ("[x-]", "-"),
            ("[x-]", "z"),
            ("[-x]", "x"),
            ("[-x]", "-"),
            ("[-x]", "a"),
            ("\\", "a"),
            ("[a-b-c]", "a"),
            ("[", "a"),
            ("[^", "a"),
            ("[^bc", "a"),
            ("a[", "a"),
            ("a[", "ab"),
            ("a[", "x"),
            ("a/b[", "x"),
            ("*x[", "x"),
            ("*x\\", "x"),
            ("[a]b[", "ab"),
        ];
        for (pattern, name) in table {
            assert!(!path_match(pattern, name), "{pattern:?} vs {name:?}");
        }
    }
}
