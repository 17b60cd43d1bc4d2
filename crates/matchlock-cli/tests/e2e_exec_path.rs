//! `matchlock exec`'s host path (issue 11, item 1): it goes straight to the sandbox's exec
//! relay and reads the state database only to explain a failure.

mod common;

use common::{env, ok, stderr};

/// One sandbox: exec works while the state database is out of the way (so it is not on the
/// warm path), and every failure still gets its message from the database.
#[test]
fn exec_skips_the_state_db_and_still_explains_failures() {
    let e = env();
    let id = e.detached(&[]);
    let _guard = e.guard(&id);

    let db = e.state_dir().join("state.db");
    let away = e.state_dir().join("state.db.away");
    std::fs::rename(&db, &away).expect("move state.db away");
    let o = e.run(&["exec", &id, "--", "sh", "-c", "echo via-relay; exit 3"]);
    std::fs::rename(&away, &db).expect("put state.db back");
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(common::stdout(&o), "via-relay\n");

    // Unknown and malformed ids: the database's answer, never a path outside `vms/`.
    let o = e.run(&["exec", "vm-00000000", "true"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("VM not found vm-00000000"),
        "{}",
        stderr(&o)
    );
    let o = e.run(&["exec", "../../etc", "true"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("VM not found"), "{}", stderr(&o));

    // A relay socket nobody serves (a crashed owner leaves it behind): the database says why.
    let fake = "vm-feedf00d";
    let dir = e.state_dir().join("vms").join(fake);
    std::fs::create_dir_all(&dir).expect("mkdir");
    drop(std::os::unix::net::UnixListener::bind(dir.join("exec.sock")).expect("bind"));
    let o = e.run(&["exec", fake, "true"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!("VM not found {fake}")),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(&dir).expect("rm fake dir");

    ok(&e.run(&["exec", &id, "true"]));
}
