//! Shell completion scripts and man pages, generated from the CLI definitions; no VM needed.

mod common;

use common::{ok, stderr};

fn bare() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_matchlock"))
}

/// Every visible subcommand, read from `matchlock --help` (and checked against a fixed list so
/// a help parsing slip cannot make the tests below vacuous).
fn subcommands() -> Vec<String> {
    let help = ok(&bare().arg("--help").output().expect("run"));
    let names: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|n| n != "help")
        .collect();
    for c in [
        "run",
        "exec",
        "list",
        "get",
        "inspect",
        "kill",
        "rm",
        "prune",
        "gc",
        "log",
        "image",
        "pull",
        "build",
        "volume",
        "port-forward",
        "allow-list",
        "rpc",
        "diagnose",
        "completion",
        "version",
    ] {
        assert!(names.iter().any(|n| n == c), "{c} not in --help: {help}");
    }
    names
}

#[test]
fn completion_scripts_name_every_subcommand() {
    let subs = subcommands();
    for shell in ["bash", "zsh", "fish", "powershell"] {
        let script = ok(&bare().args(["completion", shell]).output().expect("run"));
        assert!(script.len() > 1000, "{shell}: {script}");
        for s in &subs {
            assert!(script.contains(s.as_str()), "{shell} script lacks {s}");
        }
        // Nested commands are completed too.
        assert!(script.contains("import"), "{shell} lacks `image import`");
    }
}

#[test]
fn bash_completion_loads_and_completes() {
    // Source the script in a real bash and ask it to complete `matchlock im` and
    // `matchlock image i`.
    let script = ok(&bare().args(["completion", "bash"]).output().expect("run"));
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("matchlock.bash");
    std::fs::write(&path, script).expect("write");
    let probe = r#"
        source "$1" || exit 3
        complete -p matchlock || exit 4
        COMP_WORDS=(matchlock im); COMP_CWORD=1; COMP_LINE="matchlock im"; COMP_POINT=${#COMP_LINE}
        _matchlock matchlock im matchlock
        echo "top: ${COMPREPLY[*]}"
        COMP_WORDS=(matchlock image i); COMP_CWORD=2; COMP_LINE="matchlock image i"; COMP_POINT=${#COMP_LINE}
        _matchlock matchlock i image
        echo "image: ${COMPREPLY[*]}"
    "#;
    let o = std::process::Command::new("bash")
        .args(["-c", probe, "probe"])
        .arg(&path)
        .output()
        .expect("bash");
    let out = ok(&o);
    assert!(out.contains("top: image"), "{out}\n{}", stderr(&o));
    assert!(out.contains("image: import"), "{out}\n{}", stderr(&o));
}

#[test]
fn man_page_lists_every_subcommand_and_renders() {
    let subs = subcommands();
    let page = ok(&bare().arg("man").output().expect("run"));
    assert!(page.contains(".TH matchlock 1"), "{page}");
    assert!(page.contains(".SH SUBCOMMANDS"), "{page}");
    for s in &subs {
        assert!(
            page.contains(&format!("matchlock\\-{}(1)", s.replace('-', "\\-"))),
            "man page lacks {s}"
        );
    }
    // Render it with man(1) (man-db + groff) as a user would: `matchlock man | man -l -`.
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("matchlock.1");
    std::fs::write(&file, &page).expect("write");
    let o = std::process::Command::new("man")
        .arg("-l")
        .arg(&file)
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
        .expect("man(1) is part of the base system (man-db)");
    let text = ok(&o);
    for section in ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "SUBCOMMANDS"] {
        assert!(
            text.contains(section),
            "rendered page lacks {section}:\n{text}"
        );
    }
    for s in &subs {
        assert!(
            text.contains(&format!("matchlock-{s}(1)")),
            "rendered page lacks {s}"
        );
    }
}

#[test]
fn man_dir_writes_one_page_per_command() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("man1");
    ok(&bare()
        .args(["man", "--dir"])
        .arg(&out)
        .output()
        .expect("run"));
    let mut expected = vec![
        "matchlock.1".to_string(),
        "matchlock-image-import.1".to_string(),
    ];
    expected.extend(subcommands().iter().map(|s| format!("matchlock-{s}.1")));
    for name in expected {
        let page =
            std::fs::read_to_string(out.join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(page.contains(".TH matchlock"), "{name}: {page}");
    }
    assert!(
        !out.join("matchlock-man.1").exists(),
        "the hidden man command got a page"
    );
    let run = std::fs::read_to_string(out.join("matchlock-run.1")).expect("run page");
    assert!(run.contains("\\-\\-image"), "{run}");
}
