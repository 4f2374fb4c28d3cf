//! Every example in the repository is valid, so that what users copy works.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

#[test]
fn every_example_validates_cleanly() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let (objects, problems) = poolkeeper_source_dir::loader::validate_paths(&[root]);
    assert!(
        problems.is_empty(),
        "problems in examples:\n{}",
        problems.join("\n")
    );
    assert!(
        objects.len() >= 10,
        "expected the quickstart and pod-manager examples"
    );
}

#[test]
fn the_quickstart_declares_the_paas_pools_with_their_defaults() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart");
    let (objects, _) = poolkeeper_source_dir::loader::validate_paths(&[root]);
    let warm: Vec<(String, u32, u16)> = objects
        .iter()
        .filter_map(|o| match &o.spec {
            poolkeeper_kinds::Spec::Pool(p) => Some((
                o.name.clone(),
                p.warm,
                p.host_ports.map(|r| r.start).unwrap_or(0),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        warm,
        vec![
            ("nginx".into(), 5, 8000),
            ("apache".into(), 3, 8100),
            ("python".into(), 3, 8200),
            ("node".into(), 2, 8300),
            ("ssh".into(), 2, 8400)
        ]
    );
}

#[test]
fn every_steps_file_of_the_examples_parses() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/flows/03-command-automation");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "steps") {
            let steps = poolkeeper::access::load_steps(&e.path()).unwrap();
            assert!(steps.steps.len() >= 3, "{}", e.path().display());
            n += 1;
        }
    }
    assert_eq!(n, 2);
}
